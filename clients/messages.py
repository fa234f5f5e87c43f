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

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
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
        return cls.from_config(msg.content[CONFIG])

    @classmethod
    def from_config(cls, record: Mapping) -> "TrainInstruction":
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


# -- secure aggregation ----------------------------------------------------------------------
# Flower's SecAgg+ (its client mod and server workflow) speaks the legacy FitIns / FitRes
# layout: the global state and the update travel as ordered lists of arrays without names, in
# the global state's order (the client knows the names from its model).

def is_secure_train(msg: Message) -> bool:
    """A train message of the SecAgg+ workflow (legacy FitIns layout) rather than ours."""
    return "fitins.parameters" in msg.content.array_records


def secure_instruction(msg: Message) -> TrainInstruction:
    """The round and experiment of a SecAgg+ train message, without decoding its arrays."""
    return TrainInstruction.from_config(msg.content.config_records["fitins.config"])


@dataclass(frozen=True)
class SecureTrainInstruction:
    instruction: TrainInstruction
    global_arrays: list[np.ndarray]  # the global state's arrays, in its order

    @classmethod
    def from_message(cls, msg: Message) -> "SecureTrainInstruction":
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        return cls(secure_instruction(msg), parameters_to_ndarrays(fitins.parameters))

    def global_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        if len(names) != len(self.global_arrays):
            raise ValueError(f"the server sent {len(self.global_arrays)} arrays, the model has {len(names)}")
        return {n: torch.from_numpy(np.array(a)) for n, a in zip(names, self.global_arrays)}


def secure_vector(arrays: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                  gradients: Collection[str]) -> list[np.ndarray]:
    """What a client feeds into SecAgg+, in the global state's order: the FedSGD gradients as
    they are, every other array as its change from the global state (small numbers that fit
    the protocol's clipping range, where whole weights and BatchNorm variances might not)."""
    return [(arrays[n] if n in gradients else arrays[n].double() - g.double()).detach().cpu().double().numpy()
            for n, g in global_state.items()]


def from_secure_mean(mean: list[np.ndarray], global_state: Mapping[str, torch.Tensor],
                     gradients: Collection[str]) -> dict[str, torch.Tensor]:
    """The weighted mean of the clients' `secure_vector`s back as the weighted mean of their
    replies (what FedAvg's aggregate of plain replies would be)."""
    if len(mean) != len(global_state):
        raise ValueError(f"the aggregate has {len(mean)} arrays, the global state {len(global_state)}")
    return {n: torch.from_numpy(np.asarray(m, dtype=np.float64)).reshape(g.shape)
            + (0 if n in gradients else g.double())
            for (n, g), m in zip(global_state.items(), mean)}


def secure_reply_content(vector: list[np.ndarray], reply: TrainReply) -> RecordDict:
    """The reply the SecAgg+ mod masks: the vector and the weight, and in the clear only what
    FedAvg's bookkeeping needs (examples, loss, partition id, local steps). Labels are never
    sent: under secure aggregation they would give away what the masking hides."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    metrics = {NUM_EXAMPLES: reply.num_examples, TRAIN_LOSS: reply.train_loss,
               PARTITION_ID: reply.partition_id, LOCAL_STEPS: reply.local_steps}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), reply.num_examples, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def reply_partition(msg: Message) -> int:
    """The partition id of a train reply, without decoding its arrays."""
    return int(msg.content[METRICS][PARTITION_ID])


__all__ = ["PartitionInfo", "TrainInstruction", "TrainReply", "reply_partition", "METRICS", "NUM_EXAMPLES", "TRAIN_LOSS",
           "LOCAL_STEPS", "PARTITION_ID", "is_secure_train", "secure_instruction", "SecureTrainInstruction", "secure_vector",
           "from_secure_mean", "secure_reply_content"]
