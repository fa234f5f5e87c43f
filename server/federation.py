"""One experiment's federation, as the ServerApp runs it, on any Grid (Flower's simulation
engine under Ray, `flwr run`, or the in-process grid).

Per round: the strategy samples partitions (seeded) and sends the global weights; the
clients reply; victims' updates become attack cases (what the threat model lets the server
know) and go to the attack runner; the strategy aggregates; the server evaluates the new
global model on the held-out test set; the round is recorded and the global weights are
checkpointed in the run's store, so `--resume` continues from the last finished round.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clients.messages import (LOCAL_STEPS, METRICS, NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS, PartitionInfo,
                              TrainInstruction, TrainReply, from_secure_mean, reply_partition)
from fl_sim.config import ExperimentConfig
from fl_sim.federated_data import FederatedData, choose_victims, client_sample, federated_data, public_set, stack
from fl_sim.models import build_model
from fl_sim.results import AttackRecord, RoundRecord, RunDirectory
from fl_sim.training import evaluate
from server.attack_runner import PUBLIC_SET_FIELDS, AttackRunner, AttackTask, RunnerEvents, Victim
from server.bn_statistics import server_statistics
from server.cases import identity_gallery, initial_global_state, make_case
from server.secure_aggregation import SecureAggregation, SecureRound
from server.strategy import CuriousFedAvg, central_dp, train_metrics

log = logging.getLogger("fl_sim.server")

STATE_WEIGHTS = "global_weights"  # runs before checkpoint files kept the weights in the store
STATE_ROUND = "last_round"
AGGREGATE = -1  # the "client" of an attack on a securely aggregated round: every sampled client


def max_client_examples(config: ExperimentConfig, data: FederatedData, population: list[int]) -> int:
    """The most images a client trains on in a round (its sample's size is the same every round)."""
    return max((len(client_sample(config, data, p, 1)) for p in population), default=1)


class FederationError(RuntimeError):
    pass


@dataclass
class Job:
    """What the ServerApp needs to run one experiment."""

    config: ExperimentConfig
    run: RunDirectory
    resume: bool = False
    console: Console = field(default_factory=Console)
    stop: threading.Event = field(default_factory=threading.Event)
    reply_timeout: float = 3600.0
    node_timeout: float = 300.0  # how long to wait for every client node to join
    attack_failures: list[tuple[int, int, str, str]] = field(default_factory=list)  # filled by serve


class Display:
    """Rich progress for rounds and attacks, a one-line summary per round."""

    def __init__(self, console: Console, rounds: int, done: int) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.rounds = self.progress.add_task("rounds", total=rounds, completed=done, info="")
        self.attack: int | None = None

    def __enter__(self) -> "Display":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def round_started(self, rnd: int, total: int) -> None:
        self.progress.update(self.rounds, description=f"round {rnd}/{total}", info="training")

    def attack_start(self, task: AttackTask, total: int) -> None:
        who = f"c{task.client}" if not task.together else f"{len(task.together)} victims"
        if task.client == AGGREGATE and not task.together:
            who = "aggregate"
        desc = f"  attack {task.attack.key} r{task.round} {who}"
        if self.attack is None:
            self.attack = self.progress.add_task(desc, total=total or None, info="")
        else:
            self.progress.reset(self.attack, description=desc, total=total or None, info="", visible=True)

    def attack_iteration(self, task: AttackTask, it: int, total: int, loss: float) -> None:
        if self.attack is not None:
            self.progress.update(self.attack, completed=it, total=total, info=f"loss {loss:.4g}")

    def attack_done(self, task: AttackTask, rec: AttackRecord) -> None:
        if self.attack is not None:
            self.progress.update(self.attack, visible=False)
        who = "aggregate" if rec.client == AGGREGATE else f"c{rec.client}"
        self.print(f"  r{rec.round} {who} {rec.attack}: psnr {_f(rec.psnr, '.2f')} ssim {_f(rec.ssim, '.3f')}"
                   f" lpips {_f(rec.lpips, '.3f')} id {_f(rec.id_similarity, '.3f')}"
                   f" labels {_f(rec.label_accuracy, '.2f')} ({rec.iterations} it, {rec.seconds:.1f} s)")

    def round_done(self, rec: RoundRecord, total: int, failed: int, attacks: list[AttackRecord]) -> None:
        self.progress.update(self.rounds, completed=rec.round, info=f"acc {_f(rec.test_accuracy, '.1%')}")
        leak = ""
        if attacks:
            by: dict[str, list[float]] = {}
            for a in attacks:
                by.setdefault(a.attack, []).append(a.psnr)
            leak = " | " + " ".join(f"{k} psnr {_f(float(np.nanmean(v)), '.2f')}" for k, v in by.items())
        fail = f" ({failed} failed)" if failed else ""
        self.print(f"round {rec.round}/{total}: acc {_f(rec.test_accuracy, '.1%')} loss {_f(rec.test_loss, '.3f')}"
                   f" train {_f(rec.train_loss, '.3f')}, {rec.clients} clients{fail}, {rec.seconds:.1f} s{leak}")


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class Federation:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.config = job.config
        # Our own handle on the run directory: this may run in run_simulation's server
        # thread, and a SQLite connection belongs to the thread that opened it.
        self.run = RunDirectory(job.run.path)
        self.data: FederatedData = federated_data(self.config)
        # Built once: it loads the public faces and a model (bn_statistics: public; else None).
        self.statistics = server_statistics(self.config, self.data)
        self.initial_state = initial_global_state(self.config, self.data, self.statistics)
        self.model = build_model(self.config.model.name, self.data.num_classes)  # for evaluation
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.display: Display | None = None
        self.runner = AttackRunner(self.run, self.config.attacks, self.config.metrics, self.config.device,
                                   self.config.engine.attack_parallelism, public=self._public_if_needed(),
                                   events=RunnerEvents(self._attack_start, self._attack_iteration, self._attack_done),
                                   stop=job.stop, together=self.config.engine.attack_together,
                                   gallery=identity_gallery(self.config, self.data))
        self.round_attacks: list[AttackRecord] = []
        self._described = False

    # -- setup ----------------------------------------------------------------------------
    def _public_if_needed(self) -> torch.Tensor | None:
        if not self.config.attacks:
            return None
        from attacks.registry import config_fields

        if not any(set(PUBLIC_SET_FIELDS) & set(config_fields(a.name)) for a in self.config.attacks):
            return None
        return public_set(self.config, self.data).images

    def map_partitions(self, grid: Grid) -> dict[int, int]:
        """Partition id -> node id, from one query round (node ids are random each run)."""
        nodes = self.wait_for_nodes(grid)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = self.exchange(grid, msgs)
        mapping: dict[int, int] = {}
        for r in replies:
            if r.has_error():
                log.warning("node %d did not answer the partition query: %s", r.metadata.src_node_id, r.error.reason)
                continue
            mapping[PartitionInfo.from_message(r).partition_id] = r.metadata.src_node_id
        if not mapping:
            raise FederationError("no client answered the partition query")
        expected = self.config.federation.num_clients
        if len(nodes) != expected:
            log.warning("the federation has %d nodes, the config %d clients", len(nodes), expected)
        return mapping

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The federation's nodes, once all of them have joined. Flower's simulation engine
        registers its supernodes while the ServerApp starts: asking at once has seen 81 of
        100, and sampling from a partial population samples other clients than the same
        config on another engine (or another run) would."""
        expected = self.config.federation.num_clients
        deadline = time.monotonic() + self.job.node_timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline and not self.job.stop.is_set():
            time.sleep(0.1)
            nodes = list(grid.get_node_ids())
        return nodes

    def restore(self) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """First round to run, the global weights to start from and the server optimiser's state."""
        if self.job.resume:
            saved = self.run.checkpoint(STATE_ROUND)
            if saved is not None:
                return saved[0] + 1, saved[1], self.run.checkpoint_server_state(saved[0])
            blob, last = self.run.get_state(STATE_WEIGHTS), self.run.get_state(STATE_ROUND)
            if blob is not None and last is not None:  # a run from before checkpoint files
                return int(last.decode()) + 1, state_from_bytes(blob), {}
        return 1, {k: v.clone() for k, v in self.initial_state.items()}, {}

    # -- the rounds -----------------------------------------------------------------------
    def serve(self, grid: Grid) -> None:
        cfg = self.config
        total = cfg.federation.rounds
        start, state, velocity = self.restore()
        if start > total:
            self.job.console.print(f"all {total} rounds are done")
            return
        node_of = self.map_partitions(grid)
        population = [p for p in self.data.non_empty() if p in node_of]
        empty = cfg.federation.num_clients - len(self.data.non_empty())
        if empty:
            log.warning("%d of %d clients hold no images and are never sampled", empty, cfg.federation.num_clients)
        strategy = CuriousFedAvg(cfg, node_of, population, self.param_names, observer=self.observe,
                                 statistics=self.statistics, velocity=velocity)
        self.strategy = strategy
        aggregator = central_dp(cfg, strategy)  # the strategy, or Flower's DP wrapper around it
        secure = None
        if cfg.federation.secure_aggregation is not None:
            secure = SecureAggregation(cfg, max_client_examples(cfg, self.data, population), self.job.reply_timeout)
        arrays = ArrayRecord(state)
        experiment_json = cfg.model_dump_json()
        if start > 1:
            self.job.console.print(f"resuming after round {start - 1}")
        with Display(self.job.console, total, start - 1) as display:
            self.display = display
            for rnd in range(start, total + 1):
                if self.job.stop.is_set():
                    break
                t0 = time.perf_counter()
                display.round_started(rnd, total)
                self.round_attacks = []
                instruction = TrainInstruction(rnd, experiment_json).to_config_record()
                if secure is None:
                    new_arrays, metrics = self.plain_round(grid, rnd, arrays, instruction, aggregator)
                else:
                    new_arrays, metrics = self.secure_round(grid, rnd, arrays, instruction, secure)
                self.runner.wait()
                if self.job.stop.is_set():
                    break  # an interrupted round is not recorded: a resume redoes it
                if new_arrays is None:
                    reasons = "; ".join(sorted({r.splitlines()[0] for _, r in strategy.failed}))[:500]
                    raise FederationError(f"round {rnd}: no usable client reply ({reasons or 'no replies'})")
                arrays = new_arrays
                state = arrays.to_torch_state_dict()
                acc, loss = float("nan"), float("nan")
                if rnd % cfg.federation.eval_every == 0 or rnd == total:
                    display.progress.update(display.rounds, info="evaluating")
                    acc, loss = self.evaluate(state)
                rec = RoundRecord(round=rnd, test_accuracy=acc, test_loss=loss, clients=len(strategy.sampled),
                                  seconds=time.perf_counter() - t0,
                                  train_loss=float(metrics[TRAIN_LOSS]) if metrics else float("nan"),
                                  sampled=" ".join(map(str, strategy.sampled)))
                # The round record first, then the checkpoint: a kill in between redoes the
                # round on resume (and replaces the record), never skips it.
                self.run.add_round(rec)
                self.run.save_checkpoint(state, rnd, STATE_ROUND, cfg.federation.save_rounds,
                                         server_state=strategy.velocity)
                display.round_done(rec, total, len(strategy.failed), self.round_attacks)
            self.display = None
        self.job.attack_failures.extend(self.runner.failures)

    def plain_round(self, grid: Grid, rnd: int, arrays: ArrayRecord, instruction: ConfigRecord,
                    aggregator) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Every sampled client's update reaches the server; the attacks see each as it arrived."""
        messages = aggregator.configure_train(rnd, arrays, instruction, grid)
        replies = self.exchange(grid, messages)
        if self.job.stop.is_set():
            return None, None
        valid = self.strategy.screen(rnd, replies)
        # Flower's DP wrapper draws its noise from numpy's global generator: seeded per
        # round, so a run (and a resumed one) is reproducible
        np.random.seed((self.config.seed * 1_000_003 + rnd) % 2**32)
        return aggregator.aggregate_train(rnd, valid)

    def secure_round(self, grid: Grid, rnd: int, arrays: ArrayRecord, instruction: ConfigRecord,
                     secure: SecureAggregation) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+: the server learns the weighted mean of the sampled clients' updates and
        nothing else; the attacks target that aggregate."""
        strategy = self.strategy
        nodes = strategy.sample(rnd, arrays)
        result = secure.run_round(grid, rnd, arrays, instruction, nodes)
        if result is None:
            strategy.failed = [(-1, "secure aggregation halted: too few clients answered to unmask the aggregate")]
            return None, None
        strategy.failed = [(-1, reason) for reason in result.failures]
        global_state = arrays.to_torch_state_dict()
        gradients = set(self.param_names) if self.config.federation.algorithm == "fedsgd" else set()
        mean = from_secure_mean(result.mean, global_state, gradients)
        self.observe_aggregate(rnd, global_state, mean, result)
        metrics = train_metrics([RecordDict({METRICS: MetricRecord(m)}) for m in result.client_metrics], NUM_EXAMPLES)
        return strategy.server_step(ArrayRecord({k: Array(np.ascontiguousarray(v.numpy())) for k, v in mean.items()})), metrics

    def exchange(self, grid: Grid, messages) -> list[Message]:
        """`grid.send_and_receive`, but it gives up when the job is stopped (a Flower grid
        waits for replies up to its timeout, which would hold the process after Ctrl-C)."""
        pending = set(grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.monotonic() + self.job.reply_timeout
        while pending:
            got = list(grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or self.job.stop.is_set() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if pending and not self.job.stop.is_set():
            log.warning("%d of %d clients did not reply in %.0f s", len(pending), len(pending) + len(replies),
                        self.job.reply_timeout)
        return replies

    def evaluate(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of the global model on the held-out test set."""
        test = self.data.test_set()
        self.model.load_state_dict(state)
        return evaluate(self.model, test.normalise(test.images), test.labels)

    # -- the curious part -----------------------------------------------------------------
    def observe(self, rnd: int, global_arrays: ArrayRecord, replies: list[Message]) -> None:
        """Attack the round's victims (the strategy calls this before aggregating)."""
        cfg = self.config
        victims = choose_victims(cfg, self.strategy.sampled, rnd)
        if not victims or not (cfg.attacks or cfg.threat.save_cases):
            return
        by_pid = {reply_partition(m): m for m in replies}
        global_state: dict[str, torch.Tensor] | None = None
        victims_cases: list[Victim] = []
        for pid in victims:
            if pid not in by_pid:
                log.warning("round %d: victim %d sent no usable update; not attacked", rnd, pid)
                continue
            if not self.runner.pending(rnd, pid) and not cfg.threat.save_cases:
                continue
            if global_state is None:
                global_state = global_arrays.to_torch_state_dict()
            case = make_case(cfg, self.data, rnd, TrainReply.from_message(by_pid[pid]), global_state, self.param_names)
            victims_cases.append(self._victim(rnd, pid, case, client_sample(cfg, self.data, pid, rnd)))
        self.runner.submit_round(victims_cases)

    def observe_aggregate(self, rnd: int, global_state: dict[str, torch.Tensor], mean: dict[str, torch.Tensor],
                          result: SecureRound) -> None:
        """Under secure aggregation the one update the server sees is the round's aggregate:
        attacked as one case whose batch is every sampled client's images (exact for FedSGD,
        whose weighted mean gradient is the gradient of the union batch; for FedAvg the
        attacker's best model of several clients' local training)."""
        cfg = self.config
        if not choose_victims(cfg, self.strategy.sampled, rnd) or not (cfg.attacks or cfg.threat.save_cases):
            return
        if not self.runner.pending(rnd, AGGREGATE) and not cfg.threat.save_cases:
            return
        n = max(result.num_examples, 1)
        loss = sum(float(m[TRAIN_LOSS]) * float(m[NUM_EXAMPLES]) for m in result.client_metrics) / n
        steps = max(int(m[LOCAL_STEPS]) for m in result.client_metrics)
        arrays = {k: v.to(global_state[k].dtype) for k, v in mean.items()}
        reply = TrainReply(arrays, result.num_examples, loss, AGGREGATE, steps)
        case = make_case(cfg, self.data, rnd, reply, global_state, self.param_names)
        case.meta["secure_aggregation"] = len(result.client_metrics)
        clients = sorted(int(m[PARTITION_ID]) for m in result.client_metrics)
        index = np.concatenate([client_sample(cfg, self.data, p, rnd) for p in clients])
        self.runner.submit_round([self._victim(rnd, AGGREGATE, case, index)])

    def _victim(self, rnd: int, pid: int, case, index: np.ndarray) -> Victim:
        """A case with its truth (the images it was computed on), saved when the threat
        model asks for it; the threat model is printed once."""
        cfg = self.config
        truth_images, truth_labels = stack(self.data, index)
        if cfg.threat.save_cases:
            folder = self.run.path / "cases"
            case.save(folder / f"r{rnd}_c{pid}.pt")
            torch.save({"images": truth_images, "labels": truth_labels}, folder / f"r{rnd}_c{pid}_truth.pt")
        if not self._described and self.display is not None and self.runner.pending(rnd, pid):
            who = (f"secure aggregation: the aggregate of {case.meta['secure_aggregation']} clients, "
                   if pid == AGGREGATE else "")
            self.display.print(f"threat model: {who}{case.describe()}")
            self._described = True
        return Victim(rnd, pid, case, truth_images, truth_labels, truth_index=index)

    # -- display hooks --------------------------------------------------------------------
    def _attack_start(self, task: AttackTask, total: int) -> None:
        if self.display:
            self.display.attack_start(task, total)

    def _attack_iteration(self, task: AttackTask, it: int, total: int, loss: float) -> None:
        if self.display:
            self.display.attack_iteration(task, it, total, loss)

    def _attack_done(self, task: AttackTask, rec: AttackRecord) -> None:
        self.round_attacks.append(rec)
        if self.display:
            self.display.attack_done(task, rec)


__all__ = ["Federation", "Job", "FederationError", "STATE_WEIGHTS", "STATE_ROUND", "AGGREGATE"]
