"""The Flower ClientApp (Message API).

- `query`: replies with the client's partition id, so the server can map Flower's random
  node ids to partitions once and sample partitions itself (reproducibly).
- `train`: the round's local update (clients/training.py). The experiment config travels in
  the message (`config["experiment"]`, JSON) because `run_simulation` leaves `run_config`
  empty; the client rebuilds its partition from it (deterministic, cached per process).

Reply: one ArrayRecord `arrays` (FedSGD: gradient by parameter name plus the BatchNorm
buffers after the forward; FedAvg: the new state_dict), one MetricRecord `metrics`
(num-examples, train-loss, partition-id, local-steps), and, only when the threat model says
clients send their labels, a ConfigRecord `client` with them.
"""
from __future__ import annotations

import functools

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.config import ExperimentConfig

app = ClientApp()


@functools.lru_cache(maxsize=4)
def experiment(config_json: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(config_json)


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = MetricRecord({"partition-id": partition_id(context),
                         "num-partitions": int(context.node_config.get("num-partitions", 0))})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from clients.training import local_update

    cfg_record = msg.content["config"]
    config = experiment(str(cfg_record["experiment"]))
    server_round = int(cfg_record["server-round"])
    pid = partition_id(context)
    state = msg.content["arrays"].to_torch_state_dict()
    update = local_update(config, pid, server_round, state)
    content = RecordDict({
        "arrays": ArrayRecord(update.arrays),
        "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": update.train_loss,
                                 "partition-id": pid, "local-steps": update.local_steps}),
    })
    if config.threat.labels_known:
        content["client"] = ConfigRecord({"labels": [int(y) for y in update.labels]})
    return Message(content, reply_to=msg)


__all__ = ["app"]
