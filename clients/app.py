"""The Flower ClientApp (Message API).

- `query`: replies with the client's partition id (`PartitionInfo`), so the server can map
  Flower's random node ids to partitions once and sample partitions itself (reproducibly).
- `train`: the round's local update (`clients.training.local_update`), sent back as a
  `TrainReply`. The experiment config travels in the message (`TrainInstruction`); the client
  rebuilds its partition from it (deterministic, cached per process).

The record layout is `clients/messages.py`'s; nothing here spells a record key.
"""
from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.messages import PartitionInfo, TrainInstruction
from fl_sim.config import ExperimentConfig

app = ClientApp()


@functools.lru_cache(maxsize=4)
def experiment(config_json: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(config_json)


def partition_info(context: Context) -> PartitionInfo:
    return PartitionInfo(int(context.node_config["partition-id"]), int(context.node_config.get("num-partitions", 0)))


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(partition_info(context).to_content(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from clients.training import local_update

    instruction = TrainInstruction.from_message(msg)
    config = experiment(instruction.experiment_json)
    pid = partition_info(context).partition_id
    reply = local_update(config, pid, instruction.server_round, TrainInstruction.global_state(msg))
    return Message(reply.to_content(), reply_to=msg)


__all__ = ["app"]
