"""Secure aggregation: one round of Flower's SecAgg+ protocol, driven by the federation's
own round loop.

Flower ships SecAgg+ as a workflow of four stages (set-up, key sharing, masked vectors,
unmasking) written for its legacy Strategy API: it asks a legacy strategy which nodes train
(`configure_fit`) and hands it the unmasked aggregate (`aggregate_fit`). The federation runs
its rounds itself (sampling, checkpoints, resume, the attacks), so it runs the workflow's
stages here with a bridge that answers those two calls: the nodes are the ones the curious
strategy sampled, and the aggregate is kept. Nothing else of the legacy stack is involved;
the cryptography, the masking and the unmasking are Flower's.

What the server learns per round is the weighted mean of the sampled clients' updates (in
`clients.messages.secure_vector`'s form), the number of examples, and each client's
plaintext bookkeeping (examples, loss, steps). Never an individual update.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fl_sim.config import ExperimentConfig, SecureAggregationConfig

log = logging.getLogger("fl_sim.server")


@dataclass
class SecureRound:
    """What the server learns in one securely aggregated round."""

    mean: list[np.ndarray]  # the weighted mean of the clients' secure vectors, in the global state's order
    num_examples: int
    client_metrics: list[dict[str, Any]]  # each client's plaintext bookkeeping (examples, loss, steps, id)
    failures: list[str]  # why a client's reply at some stage was an error


@dataclass
class _Node:
    """What the workflow reads of a legacy ClientProxy: its node id."""

    node_id: int


@dataclass
class _StrategyBridge:
    """The two legacy Strategy calls the SecAgg+ workflow makes."""

    nodes: list[int]
    instruction: dict[str, Any]
    results: list = field(default_factory=list)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns

        return [(_Node(n), FitIns(parameters, dict(self.instruction))) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # the workflow has put the unmasked weighted mean into every result's parameters
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


def max_weight(config: ExperimentConfig, client_examples: int) -> float:
    """The protocol's max_weight: configured, or the most examples a client trains on (the
    quantisation step of an update is relative to weight / max_weight, so the tightest bound
    keeps it finest)."""
    s = config.federation.secure_aggregation
    assert s is not None
    return float(s.max_weight) if s.max_weight is not None else float(max(client_examples, 1))


def workflow(settings: SecureAggregationConfig, weight_bound: float, timeout: float | None):
    """Flower's SecAgg+ workflow; its own checks raise on inconsistent settings."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(settings.num_shares, settings.reconstruction_threshold, max_weight=weight_bound,
                              clipping_range=settings.clipping_range,
                              quantization_range=settings.quantization_range,
                              modulus_range=settings.modulus_range, timeout=timeout)


class SecureAggregation:
    def __init__(self, config: ExperimentConfig, client_examples: int, timeout: float | None = None) -> None:
        settings = config.federation.secure_aggregation
        if settings is None:
            raise ValueError("the config has no federation.secure_aggregation")
        self.workflow = workflow(settings, max_weight(config, client_examples), timeout)

    def run_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, instruction: ConfigRecord,
                  nodes: list[int]) -> SecureRound | None:
        """The round's aggregate, or None when the protocol halted (too few clients replied
        at some stage to reconstruct the masks)."""
        from flwr.common import parameters_to_ndarrays
        from flwr.server.history import History
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        bridge = _StrategyBridge(list(nodes), dict(instruction))
        # the parts of a LegacyContext the stages read
        context = SimpleNamespace(
            state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                              MAIN_PARAMS_RECORD: arrays}),
            strategy=bridge, client_manager=SimpleNamespace(num_available=lambda: len(nodes)), history=History())
        state = WorkflowState()
        wf = self.workflow
        for stage in (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage):
            if not stage(grid, context, state):  # type: ignore[arg-type]
                log.error("round %d: secure aggregation halted at %s (%d failures)", server_round,
                          stage.__name__, len(state.failures))
                return None
        if not bridge.results:
            return None
        mean = parameters_to_ndarrays(bridge.results[0][1].parameters)
        metrics = [dict(fitres.metrics) for _, fitres in bridge.results]
        return SecureRound(mean=mean, num_examples=sum(int(fitres.num_examples) for _, fitres in bridge.results),
                           client_metrics=metrics, failures=[str(e) for e in state.failures])


__all__ = ["SecureAggregation", "SecureRound", "max_weight", "workflow"]
