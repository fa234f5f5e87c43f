"""The honest-but-curious strategy: Flower's FedAvg that follows the protocol, samples
partitions reproducibly, applies the FedSGD server step, and hands each victim's update to
an observer (the federation's attack step) before aggregating as usual.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clients.messages import METRICS, TRAIN_LOSS, reply_partition
from fl_sim.config import ExperimentConfig
from fl_sim.federated_data import force_victims, sample_clients

log = logging.getLogger("fl_sim.server")

# (server_round, global arrays, valid replies sorted by partition id) -> None
ReplyObserver = Callable[[int, ArrayRecord, list[Message]], None]


def train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the train loss, total examples, number of clients (ids are not averaged)."""
    total = sum(float(r[METRICS][weight_key]) for r in records)
    loss = sum(float(r[METRICS][TRAIN_LOSS]) * float(r[METRICS][weight_key]) for r in records)
    return MetricRecord({TRAIN_LOSS: loss / max(total, 1e-12), weight_key: int(total), "clients": len(records)})


class CuriousFedAvg(FedAvg):
    """FedAvg, honest-but-curious.

    - `configure_train` samples partition ids with a generator seeded by (seed, round) and
      sends to the nodes mapped to them (Flower's node ids change every run).
    - `screen` checks replies for errors (logged with their reason), sorts them by partition
      id and shows them to the observer; `aggregate_train` then aggregates with FedAvg (or a
      Flower wrapper around this strategy does, e.g. central DP). FedSGD: the aggregate of the clients' gradients is
      applied as `w <- w - server_lr * sum_k (n_k / n) g_k`; BatchNorm buffers are averaged,
      or re-estimated on the server's public faces (`statistics`, federation.bn_statistics).
    - With federation.server_momentum the server steps as FedAvgM does (`velocity`, saved with
      each round's checkpoint so a resumed run steps as an uninterrupted one).
    """

    def __init__(self, config: ExperimentConfig, node_of_partition: dict[int, int],
                 population: list[int], param_names: list[str],
                 observer: ReplyObserver | None = None,
                 statistics: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 velocity: dict[str, torch.Tensor] | None = None) -> None:
        # Sampling is ours (configure_train); no federated evaluation is configured (the
        # server evaluates on its test set), so the fractions are unused.
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                         min_available_nodes=1, train_metrics_aggr_fn=train_metrics)
        self.config = config
        self.node_of_partition = node_of_partition
        self.population = population
        self.param_names = list(param_names)  # trainable parameters; the rest are buffers
        self.observer = observer
        self.statistics = statistics  # the server's own BatchNorm statistics (federation.bn_statistics)
        # FedAvgM's running sum of updates per parameter (federation.server_momentum), carried over a resume
        self.velocity: dict[str, torch.Tensor] = dict(velocity or {})
        self.global_arrays: ArrayRecord | None = None
        self.sampled: list[int] = []
        self.failed: list[tuple[int, str]] = []  # (node id, reason) of the last round

    def sample(self, server_round: int, arrays: ArrayRecord) -> list[int]:
        """The round's nodes (partitions sampled reproducibly, victims forced in)."""
        self.global_arrays = arrays
        sampled = sample_clients(self.config, self.population, server_round)
        self.sampled = force_victims(self.config, sampled, self.population, server_round)
        return [self.node_of_partition[p] for p in self.sampled]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.sample(server_round, arrays)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The round's usable replies, sorted by partition id (the sum is then the same in
        every run); errors are logged. The observer sees them here, as they arrived: before
        any wrapper (central DP's clipping) touches them."""
        replies = list(replies)
        self.failed = [(m.metadata.src_node_id, m.error.reason) for m in replies if m.has_error()]
        for node, reason in self.failed:
            log.warning("round %d: node %d replied with an error: %s", server_round, node, reason)
        valid = sorted((m for m in replies if not m.has_error()), key=reply_partition)
        if valid and self.observer is not None:
            assert self.global_arrays is not None
            self.observer(server_round, self.global_arrays, valid)
        return valid

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of replies already `screen`ed, then the server step."""
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            return None, metrics
        return self.server_step(arrays), metrics

    def server_step(self, aggregate: ArrayRecord) -> ArrayRecord:
        """New global arrays from the weighted mean of the replies (FedAvg's, or the secure
        aggregate's), in the global dtypes.

        Flower's FedAvgM would step inside aggregate_train, which the secure-aggregation round
        bypasses, and over every array, BatchNorm buffers and counters included; so the server
        optimiser lives here, the one step every round goes through, over the parameters only."""
        assert self.global_arrays is not None
        fed = self.config.federation
        params = set(self.param_names)
        out: dict[str, Array] = {}
        for name, current in self.global_arrays.items():
            w = current.numpy()
            agg = aggregate[name].numpy()
            if name not in params:
                new = agg  # the clients' mean BatchNorm buffers
            elif fed.server_momentum is not None:
                # FedAvg's pseudo-gradient; a copy, so the velocity never aliases the reply's buffer
                update = torch.tensor(agg if fed.algorithm == "fedsgd" else w - agg)
                previous = self.velocity.get(name)
                self.velocity[name] = update if previous is None else fed.server_momentum.momentum * previous + update
                new = w - fed.server_momentum.lr * self.velocity[name].numpy()
            elif fed.algorithm == "fedsgd":
                new = w - fed.server_lr * agg
            else:
                new = agg  # FedAvg: the weighted mean
            if np.issubdtype(w.dtype, np.integer):
                new = np.rint(new)
            out[name] = Array(np.ascontiguousarray(new.astype(w.dtype, copy=False)))
        if self.statistics is not None:
            state = self.statistics({k: torch.from_numpy(a.numpy()) for k, a in out.items()})
            out = {k: Array(np.ascontiguousarray(v.numpy())) for k, v in state.items()}
        return ArrayRecord(out)

def central_dp(config: ExperimentConfig, strategy: CuriousFedAvg):
    """The strategy wrapped in Flower's server-side fixed-clipping central DP when the config
    asks for it, else the strategy itself."""
    dp = config.federation.central_dp
    if dp is None:
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    return DifferentialPrivacyServerSideFixedClipping(strategy, dp.noise_multiplier, dp.clipping_norm,
                                                      config.federation.clients_per_round)


__all__ = ["CuriousFedAvg", "train_metrics", "central_dp"]
