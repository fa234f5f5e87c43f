"""The Flower ClientApp (Message API).

- `query`: replies with the client's partition id (`PartitionInfo`), so the server can map
  Flower's random node ids to partitions once and sample partitions itself (reproducibly).
- `train`: the round's local update (`clients.training.local_update`), sent back as a
  `TrainReply`. The experiment config travels in the message (`TrainInstruction`); the client
  rebuilds its partition from it (deterministic, cached per process).
- Under secure aggregation the same update goes through Flower's SecAgg+ client mod, which
  masks it: the server's workflow talks to the mod (key set-up, masked vector, unmasking) and
  the mod calls `train` once per round for the update it masks.

The record layout is `clients/messages.py`'s; nothing here spells a record key.
"""
from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from clients.messages import (PartitionInfo, SecureTrainInstruction, TrainInstruction, is_secure_train,
                              secure_instruction, secure_reply_content, secure_vector)
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


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client mod for the SecAgg+ workflow's messages; the plain protocol's
    train messages pass straight through (the mod would refuse them)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    if is_secure_train(msg):
        # The mod quantises the update with stochastic rounding from numpy's global generator:
        # seeded per (seed, round, client), so a securely aggregated run repeats (the masks are
        # random too, but they cancel exactly in the sum).
        import numpy as np

        from fl_sim.federated_data import client_seed

        instruction = secure_instruction(msg)
        config = experiment(instruction.experiment_json)
        np.random.seed(client_seed(config, partition_info(context).partition_id, instruction.server_round) % 2**32)
    return secaggplus_mod(msg, context, call_next)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    from clients.training import local_update, state_layout

    if is_secure_train(msg):
        secure = SecureTrainInstruction.from_message(msg)
        config = experiment(secure.instruction.experiment_json)
        names, gradients = state_layout(config)
        global_state = secure.global_state(names)
        reply = local_update(config, partition_info(context).partition_id, secure.instruction.server_round,
                             global_state)
        return Message(secure_reply_content(secure_vector(reply.arrays, global_state, gradients), reply),
                       reply_to=msg)

    instruction = TrainInstruction.from_message(msg)
    config = experiment(instruction.experiment_json)
    pid = partition_info(context).partition_id
    reply = local_update(config, pid, instruction.server_round, TrainInstruction.global_state(msg))
    return Message(reply.to_content(), reply_to=msg)


__all__ = ["app"]
