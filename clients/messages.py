"""The wire format between the strategy and the ClientApp, as typed dataclasses.

Flower messages carry `RecordDict`s keyed by strings; every key is spelled here once, and
both sides convert through these classes, so a renamed field is a type error rather than a
silent `KeyError` in another process.

- `PartitionQuery` reply: which partition a node holds (the server maps Flower's random
  node ids to partitions once, then samples partitions itself, reproducibly).
- `TrainInstruction`: the round and the experiment config (JSON; `run_simulation` leaves
  the ClientApp's `run_config` empty, so the config travels in the message), beside the
  global arrays.
- `TrainReply`: the client's update and what the server's FedAvg needs to weight it.
  Labels are included only when the threat model says clients send them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# Record names. "arrays", "config" and "num-examples" are what Flower's FedAvg reads by default.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"
CLIENT = "client"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
LOCAL_STEPS = "local-steps"
SERVER_ROUND = "server-round"
EXPERIMENT = "experiment"
LABELS = "labels"


@dataclass(frozen=True)
class PartitionInfo:
    partition_id: int
    num_partitions: int

    def to_content(self) -> RecordDict:
        return RecordDict({INFO: MetricRecord({PARTITION_ID: self.partition_id, NUM_PARTITIONS: self.num_partitions})})

    @classmethod
    def from_message(cls, msg: Message) -> "PartitionInfo":
        info = msg.content[INFO]
        return cls(int(info[PARTITION_ID]), int(info[NUM_PARTITIONS]))


@dataclass(frozen=True)
class TrainInstruction:
    server_round: int
    experiment_json: str  # ExperimentConfig.model_dump_json()

    def to_config_record(self) -> ConfigRecord:
        return ConfigRecord({EXPERIMENT: self.experiment_json, SERVER_ROUND: self.server_round})

    @classmethod
    def from_message(cls, msg: Message) -> "TrainInstruction":
        record = msg.content[CONFIG]
        return cls(int(record[SERVER_ROUND]), str(record[EXPERIMENT]))

    @staticmethod
    def global_state(msg: Message) -> dict[str, torch.Tensor]:
        return msg.content[ARRAYS].to_torch_state_dict()


@dataclass
class TrainReply:
    """What a client sends back after its local step."""

    arrays: dict[str, torch.Tensor]  # FedSGD: gradients + BatchNorm buffers; FedAvg: the new state_dict
    num_examples: int
    train_loss: float
    partition_id: int
    local_steps: int
    labels: list[int] | None = None  # only when the threat model says clients send them

    def to_content(self) -> RecordDict:
        content = RecordDict({
            ARRAYS: ArrayRecord({k: v.detach().cpu() for k, v in self.arrays.items()}),
            METRICS: MetricRecord({NUM_EXAMPLES: self.num_examples, TRAIN_LOSS: self.train_loss,
                                   PARTITION_ID: self.partition_id, LOCAL_STEPS: self.local_steps}),
        })
        if self.labels is not None:
            content[CLIENT] = ConfigRecord({LABELS: [int(y) for y in self.labels]})
        return content

    @classmethod
    def from_message(cls, msg: Message) -> "TrainReply":
        content = msg.content
        metrics = content[METRICS]
        labels = [int(y) for y in content[CLIENT][LABELS]] if CLIENT in content else None
        return cls(arrays=content[ARRAYS].to_torch_state_dict(), num_examples=int(metrics[NUM_EXAMPLES]),
                   train_loss=float(metrics[TRAIN_LOSS]), partition_id=int(metrics[PARTITION_ID]),
                   local_steps=int(metrics[LOCAL_STEPS]), labels=labels)


def reply_partition(msg: Message) -> int:
    """The partition id of a train reply, without decoding its arrays."""
    return int(msg.content[METRICS][PARTITION_ID])


__all__ = ["PartitionInfo", "TrainInstruction", "TrainReply", "reply_partition", "METRICS", "NUM_EXAMPLES", "TRAIN_LOSS"]
