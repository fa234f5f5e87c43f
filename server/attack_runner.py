"""The attack runner: every configured attack on every victim's case, each finished
(round, client, attack) written to the results store at once.

Attacks come from the registry (`attacks.registry.build_attack`) and see only the case; the
ground truth stays here, for the metrics. A (round, client, attack) already in the store is
skipped, so a resumed run never redoes a finished attack. Attacks run in this process (a
round's victims together, as one batch, for the gradient-matching presets that allow it:
`attacks/multi.py`), or as Ray tasks when Ray is connected and `parallelism` > 1 (at most
`parallelism` at once; the tasks ask Ray for no CPU because Flower's client actors hold
them all; they run while the clients are idle, during aggregation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fl_sim.config import AttackConfig, MetricsConfig
from fl_sim.results import AttackRecord, RunDirectory

log = logging.getLogger("fl_sim.attacks")

# Attack settings the runner fills with the attacker's public face set D_c (N, C, H, W in
# [0, 1]) when the attack has them and the config leaves them unset.
PUBLIC_SET_FIELDS = ("public_images",)


@dataclass
class AttackTask:
    round: int
    client: int
    attack: AttackConfig
    case: Any  # attacks.case.AttackCase
    truth_images: torch.Tensor | None  # for the metrics only; None when unknown (offline)
    truth_labels: torch.Tensor | None
    together: tuple[int, ...] = ()  # the clients attacked in one batch with this one (for display)
    truth_index: np.ndarray | None = None  # the truth's indices in the data set (re-identification)


@dataclass
class Victim:
    """One victim's case in one round, with its ground truth for the metrics."""

    round: int
    client: int
    case: Any  # attacks.case.AttackCase
    truth_images: torch.Tensor | None
    truth_labels: torch.Tensor | None
    truth_index: np.ndarray | None = None  # the truth's indices in the data set (re-identification)


@dataclass
class RunnerEvents:
    """Hooks for a progress display (all optional)."""

    on_start: Callable[[AttackTask, int], None] | None = None  # task, total iterations (0 unknown)
    on_iteration: Callable[[AttackTask, int, int, float], None] | None = None
    on_done: Callable[[AttackTask, AttackRecord], None] | None = None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _mean(values: np.ndarray | None) -> float:
    if values is None or len(values) == 0:
        return float("nan")
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def batchable(attack, cases: Sequence[Any] = ()) -> bool:
    """Whether `attacks.multi` can run this attack object on these victims at once: the
    engine's own loop (not a subclass with a loop of its own, such as GGL's latent search),
    no BatchNorm-statistics prior, and each case `batchable_case`."""
    from attacks.engine import GradientInversion

    if not (isinstance(attack, GradientInversion) and type(attack).run is GradientInversion.run
            and getattr(attack.config, "bn_stats", 0) == 0):
        return False
    return all(batchable_case(attack, c) for c in cases)


def batchable_case(attack, case) -> bool:
    """Whether one victim's case can join a batch of this attack: always for a naive attack;
    for an adaptive one, when its defenses are ones the factored matching models (zeroing
    ones: pruning, Soteria). Any other defense model needs the exact path, on which the batch
    is slower than one by one (ResNet18, 64 px, 4 victims, 2 threads: 4.1 victim-it/s
    expanded, 5.1 vmap, 8.4 one by one)."""
    if not getattr(attack.config, "adaptive", False) or not case.defenses:
        return True
    from attacks.engine import factored_masks
    from fl_sim.defenses import adaptive_model_of

    return factored_masks(adaptive_model_of(case.defenses, case.update)) is not None


def build(attack: AttackConfig, public: torch.Tensor | None = None, where: str | None = None):
    """An attack object from its config (public set filled in where it takes one); a bad
    setting is a ValueError naming `where` (default: the attack's label)."""
    from attacks.registry import build_attack_at, config_fields

    params = dict(attack.params)
    if public is not None:
        for name in PUBLIC_SET_FIELDS:
            if name in config_fields(attack.name) and params.get(name) is None:
                params[name] = public
    return build_attack_at(attack.name, params, where or attack.key)


def _ray_attack(attack: AttackConfig, case, device: str, public: torch.Tensor | None):
    """A Ray task: one attack on one case (one thread: tasks share the node's cores)."""
    torch.set_num_threads(1)
    return build(attack, public).run(case, device=device)


_REMOTE: dict[str, Any] = {}


def _remote_attack():
    if "fn" not in _REMOTE:
        import ray

        # num_cpus=0: Flower's client actors hold every CPU of the cluster; the attacks run
        # while the clients are idle (during aggregation). SPREAD puts them on many nodes.
        _REMOTE["fn"] = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_ray_attack)
    return _REMOTE["fn"]


class AttackRunner:
    def __init__(self, run: RunDirectory, attack_configs: list[AttackConfig], metrics_cfg: MetricsConfig,
                 device: str = "cpu", parallelism: int = 1, public: torch.Tensor | None = None,
                 events: RunnerEvents | None = None, stop: threading.Event | None = None,
                 together: bool = True, record_variants: bool = False, gallery=None) -> None:
        self.run = run
        self.gallery = gallery  # fl_sim.metrics.IdentityGallery: rank-1 re-identification when given
        self.attacks = list(attack_configs)
        self.metrics_cfg = metrics_cfg
        self.device = device
        self.parallelism = max(1, int(parallelism))
        self.public = public
        self.together = together
        self.record_variants = record_variants  # also score an attack's variants (benchmarks)
        self.groups: list[tuple[str, tuple[int, ...]]] = []  # (attack, clients) attacked as one batch
        self.events = events or RunnerEvents()
        self.stop = stop
        self._done = set(run.done_attacks())
        self._inflight: list[tuple[Any, AttackTask]] = []
        self._truth_saved: dict[tuple[int, int], str] = {}
        self.invocations = 0  # attacks actually started by this runner
        self.failures: list[tuple[int, int, str, str]] = []  # (round, client, attack, error)

    # -- what is left to do ---------------------------------------------------------------
    def pending(self, round: int, client: int) -> list[AttackConfig]:
        return [a for a in self.attacks if (round, client, a.key) not in self._done]

    def use_ray(self) -> bool:
        if self.parallelism <= 1:
            return False
        try:
            import ray
        except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
            return False
        return ray.is_initialized()

    # -- submitting -----------------------------------------------------------------------
    def submit(self, case, truth_images: torch.Tensor | None, truth_labels: torch.Tensor | None,
               round: int, client: int, truth_index: np.ndarray | None = None) -> list[AttackRecord]:
        """Run (or schedule) every attack not yet done on this case. In-process runs return
        their records; Ray runs return [] and are collected by `wait()`."""
        records: list[AttackRecord] = []
        for attack in self.pending(round, client):
            if self.stop is not None and self.stop.is_set():
                break
            task = AttackTask(round, client, attack, case, truth_images, truth_labels, truth_index=truth_index)
            if self.use_ray():
                self._submit_ray(task)
            elif (rec := self._run_local(task)) is not None:
                records.append(rec)
        return records

    def submit_round(self, victims: list[Victim], max_together: int | None = None) -> list[AttackRecord]:
        """Every attack not yet done on a round's victims. In-process, a gradient-matching
        attack runs on all its pending victims as one batch (of at most `max_together`) when
        their cases allow it (same global weights and shapes); everything else goes victim by
        victim, as `submit`."""
        return submit_together([(self, victims)], max_together)

    def _batches(self, owned: list[tuple["AttackRunner", AttackTask]], max_together: int | None,
                 workers: int) -> list["_Job"]:
        """One attack config's victims as jobs: batches of at most `max_together` (and, for
        `workers` processes, at least one batch each), and alone the victims that cannot join
        a batch (an attack with a loop of its own, an adaptive case the factored matching does
        not model)."""
        try:
            attack = build(owned[0][1].attack, self.public)
        except Exception as exc:  # noqa: BLE001 - reported per victim, as a lone attack would be
            for runner, t in owned:
                runner._failed(t, exc)
            return []
        if not batchable(attack):
            return [_Job([o]) for o in owned]
        alone = [_Job([o]) for o in owned if not batchable_case(attack, o[1].case)]
        joined = [o for o in owned if batchable_case(attack, o[1].case)]
        size = max_together
        if workers > 1 and joined:
            size = min(size or len(joined), -(-len(joined) // workers))
        return alone + [_Job(chunk, batched=len(chunk) > 1) for chunk in _even_chunks(joined, size)]

    def _shown(self, job: "_Job") -> AttackTask:
        """The task that stands for a job in progress displays (a batch names its clients)."""
        first = job.owned[0][1]
        return dataclasses.replace(first, together=tuple(t.client for _, t in job.owned)) if job.batched else first

    def _run_batch(self, batch: list[tuple["AttackRunner", AttackTask]]) -> list[AttackRecord]:
        """One attack config on several victims as one batch, here; each task recorded by the
        runner that owns it (this one's events, stop flag and device drive the batch)."""
        from attacks.multi import MultiVictimInversion

        tasks = [t for _, t in batch]
        shown = self._shown(_Job(batch, batched=True))
        self.invocations += len(tasks)
        try:
            attack = build(tasks[0].attack, self.public)  # fresh state for every batch
            progress = self._started(shown, attack)
            results = MultiVictimInversion(attack).run([t.case for t in tasks], progress, self.stop, self.device)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the federation
            for runner, t in batch:
                runner._failed(t, exc)
            return []
        self.groups.append((tasks[0].attack.key, shown.together))
        if self.stop is not None and self.stop.is_set() and any(r.interrupted for r in results):
            return []  # stopped mid-way: nothing finished, nothing recorded
        return self._record_batch(batch, results, attack)

    def _record_batch(self, batch: list[tuple["AttackRunner", AttackTask]], results: list,
                      attack) -> list[AttackRecord]:
        # Each victim's `seconds` is its share of the batch's time (the cost per victim).
        return [runner._record(t, dataclasses.replace(r, seconds=r.seconds / len(batch)), attack)
                for (runner, t), r in zip(batch, results)]

    def _run_in_workers(self, jobs: list["_Job"], workers: int) -> list[AttackRecord]:
        """The jobs in `workers` processes (server.attack_pool), largest first so that the
        last to finish are short; recorded here as each ends, progress shown through this
        runner's events."""
        import os

        from server.attack_pool import AttackPool, PoolJob

        jobs = sorted(jobs, key=lambda j: -len(j.owned))
        shown = [self._shown(job) for job in jobs]
        built: dict[str, Any] = {}  # an attack object per config, for recording (its `select`)
        records: list[AttackRecord] = []

        def on_progress(i: int, kind: str, a: int, b: int, loss: float) -> None:
            if kind == "start" and self.events.on_start:
                self.events.on_start(shown[i], a)
            elif kind == "iteration" and self.events.on_iteration:
                self.events.on_iteration(shown[i], a, b, loss)

        def on_result(i: int, outcome) -> None:
            job = jobs[i]
            if isinstance(outcome, BaseException):
                for runner, t in job.owned:
                    runner._failed(t, outcome)
                return
            config = job.owned[0][1].attack
            key = config.model_dump_json()
            if key not in built:
                built[key] = build(config, self.public)
            if job.batched:
                self.groups.append((config.key, shown[i].together))
            records.extend(self._record_batch(job.owned, outcome, built[key]))

        self.invocations += sum(len(j.owned) for j in jobs)
        threads = max(1, (os.cpu_count() or 1) // workers)
        with AttackPool(workers, threads, self.public) as pool:
            pool.run([PoolJob(j.owned[0][1].attack, [t.case for _, t in j.owned]) for j in jobs], self.device,
                     on_progress, on_result, lambda: self.stop is not None and self.stop.is_set())
        return records

    def _started(self, task: AttackTask, attack):
        """Tell the display an attack started; the progress object that reports its iterations."""
        from attacks.base import CallbackProgress

        if self.events.on_start:
            self.events.on_start(task, int(getattr(attack.config, "iterations", 0) or 0))
        on_it = self.events.on_iteration
        return CallbackProgress(lambda it, total, loss: on_it(task, it, total, loss)) if on_it else None

    def _run_local(self, task: AttackTask) -> AttackRecord | None:
        self.invocations += 1
        try:
            attack = build(task.attack, self.public)
            progress = self._started(task, attack)
            result = attack.run(task.case, progress=progress, stop=self.stop, device=self.device)
        except Exception as exc:  # noqa: BLE001 - one failing attack must not end the federation
            self._failed(task, exc)
            return None
        if self.stop is not None and self.stop.is_set() and result.interrupted:
            return None  # stopped mid-way: not finished, so not recorded (a resume redoes it)
        return self._record(task, result, attack)

    def _failed(self, task: AttackTask, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.failures.append((task.round, task.client, task.attack.key, text))
        log.error("attack %s on round %d client %d failed (not recorded): %s",
                  task.attack.key, task.round, task.client, text)

    def _submit_ray(self, task: AttackTask) -> None:
        import ray

        while len(self._inflight) >= self.parallelism and not self._stopping():
            self._collect()
        self.invocations += 1
        if self.events.on_start:
            self.events.on_start(task, 0)
        ref = _remote_attack().remote(task.attack, task.case, self.device, self.public)
        self._inflight.append((ref, task))

    def _stopping(self) -> bool:
        if self.stop is None or not self.stop.is_set():
            return False
        import ray

        for ref, _ in self._inflight:  # unfinished work is dropped; a resume redoes it
            ray.cancel(ref, force=True)
        self._inflight.clear()
        return True

    def _collect(self) -> list[AttackRecord]:
        """Record the Ray attacks that finish within a short wait."""
        import ray

        if not self._inflight:
            return []
        refs = [r for r, _ in self._inflight]
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
        out = []
        for ref in ready:
            i = next(i for i, (r, _) in enumerate(self._inflight) if r == ref)
            _, task = self._inflight.pop(i)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a failed task is logged, not fatal
                self._failed(task, exc)
                continue
            out.append(self._record(task, result))
        return out

    def wait(self) -> list[AttackRecord]:
        """Collect every scheduled Ray attack (no-op in-process)."""
        out: list[AttackRecord] = []
        while self._inflight and not self._stopping():
            out.extend(self._collect())
        return out

    # -- results --------------------------------------------------------------------------
    def _record(self, task: AttackTask, result, attack=None) -> AttackRecord:
        """Score a finished attack, save its pictures, write it to the store (and, when asked,
        one row per variant of the same run, e.g. what another `select` policy than the
        attack's returned)."""
        selected = getattr(getattr(attack, "config", None), "select", None)
        rec = self._scored(task, task.attack.key, result.images, result.labels, result)
        if self.record_variants:
            for name, images in result.variants.items():
                if name != selected:
                    self._scored(task, f"{task.attack.key} [{name}]", images, result.labels, result)
        self._done.add((task.round, task.client, task.attack.key))
        if self.events.on_done:
            self.events.on_done(task, rec)
        return rec

    def _scored(self, task: AttackTask, key: str, images: torch.Tensor, labels: torch.Tensor | None,
                result) -> AttackRecord:
        recon = images.detach().float().cpu().clamp(0, 1)
        truth = task.truth_images.detach().float().cpu() if task.truth_images is not None else None
        rec = AttackRecord(round=task.round, client=task.client, attack=key,
                           iterations=int(result.iterations), seconds=float(result.seconds),
                           num_images=int(len(recon)), diagnostics=json.dumps(result.diagnostics, sort_keys=True))
        if truth is None:
            pass  # no ground truth (an offline case): the reconstruction only
        elif recon.shape == truth.shape:
            names = ["psnr", "mse", "ssim"] + (["lpips"] if self.metrics_cfg.lpips else [])
            values = image_metrics(recon, truth, names, self.metrics_cfg.id_backend, self.gallery, task.truth_index)
            for k, v in values.items():
                setattr(rec, k, _mean(v))
        else:
            log.warning("attack %s returned images of shape %s, the truth is %s: no image metrics",
                        key, tuple(recon.shape), tuple(truth.shape))
        if task.truth_labels is not None and labels is not None and len(labels):
            rec.label_accuracy = label_accuracy(labels.detach().cpu().long(), task.truth_labels.cpu().long())
        if key == task.attack.key:  # the loss belongs to the image the attack returned
            rec.final_loss = float(result.final_loss) if math.isfinite(result.final_loss) else float("nan")
        pair = (task.round, task.client)
        if truth is not None and pair not in self._truth_saved:
            self._truth_saved[pair] = self.run.save_image(f"r{task.round}_c{task.client}_truth", truth)
        rec.truth_image = self._truth_saved.get(pair, "")
        rec.image = self.run.save_image(f"r{task.round}_c{task.client}_{_safe(key)}", recon)
        self.run.add_attack(rec)
        return rec


@dataclass
class _Job:
    """One attack config on one victim, or on several as one batch (`batched`)."""

    owned: list[tuple[AttackRunner, AttackTask]]
    batched: bool = False


def submit_together(parts: Sequence[tuple[AttackRunner, Sequence[Victim]]],
                    max_together: int | None = None, workers: int = 1) -> list[AttackRecord]:
    """`AttackRunner.submit_round` over the victims of several runners at once: runs that
    attack one global model under different settings (a sweep's points, each defense its own
    run directory). Each attack runs on the pending victims of all of them as one batch where
    their cases allow it, so the batch is larger and the CPU better used (ResNet18, 64 px,
    InvertG: about 13 victim-it/s at 4 victims, 24 at 16, 27 at 28); each record is written by
    the runner that owns the victim. The first runner's events, stop flag and device drive
    the batches; it runs what cannot be batched victim by victim. With `workers` > 1 on the
    CPU, the jobs (batches and lone victims) run in that many processes of one thread each
    (server.attack_pool), each batch then at most an even share of its attack's victims."""
    lead = parts[0][0]
    everyone = [(runner, v) for runner, victims in parts for v in victims]
    if not lead.together or len(everyone) < 2 or lead.use_ray():
        return [r for runner, v in everyone
                for r in runner.submit(v.case, v.truth_images, v.truth_labels, v.round, v.client, v.truth_index)]
    workers = workers if str(lead.device).startswith("cpu") else 1  # a GPU runs one job at a time
    jobs = _plan(lead, parts, everyone, max_together, workers)
    if workers > 1 and len(jobs) > 1:
        return lead._run_in_workers(jobs, workers)
    records: list[AttackRecord] = []
    for job in jobs:
        if lead.stop is not None and lead.stop.is_set():
            break
        if job.batched:
            records.extend(lead._run_batch(job.owned))
        else:
            records.extend(r for runner, t in job.owned if (r := runner._run_local(t)) is not None)
    return records


def _plan(lead: AttackRunner, parts, everyone, max_together: int | None, workers: int) -> list[_Job]:
    """Every pending (victim, attack) as jobs: per attack, the victims whose runners configure
    it identically and whose cases are compatible (attacks.multi) form batches."""
    from attacks.multi import compatible_groups

    jobs: list[_Job] = []
    for key in dict.fromkeys(a.key for runner, _ in parts for a in runner.attacks):
        groups: dict[str, list[tuple[AttackRunner, AttackTask]]] = {}
        for runner, v in everyone:
            for a in runner.attacks:
                if a.key == key and (v.round, v.client, key) not in runner._done:
                    task = AttackTask(v.round, v.client, a, v.case, v.truth_images, v.truth_labels,
                                      truth_index=v.truth_index)
                    groups.setdefault(a.model_dump_json(), []).append((runner, task))
        for owned in groups.values():
            for group in compatible_groups([t.case for _, t in owned]):
                kin = [owned[i] for i in group]
                jobs.extend(lead._batches(kin, max_together, workers) if len(kin) > 1 else [_Job(kin)])
    return jobs


def _even_chunks(items: list, size: int | None) -> list[list]:
    """`items` in the fewest chunks of at most `size`, as even as possible (26 + 26 rather
    than 32 + 20: throughput per victim levels off, memory does not)."""
    if not size or len(items) <= size:
        return [items] if items else []
    n = -(-len(items) // size)
    step, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + step + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def image_metrics(recon: torch.Tensor, truth: torch.Tensor, names: list[str], id_backend: str | None,
                  gallery=None, truth_index: np.ndarray | None = None):
    from fl_sim.metrics import image_metrics as _im

    return _im(recon, truth, names=names, id_backend=id_backend, gallery=gallery, truth_index=truth_index)


def label_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    from fl_sim.metrics import label_accuracy as _la

    return _la(pred, truth)


__all__ = ["AttackRunner", "AttackTask", "RunnerEvents", "PUBLIC_SET_FIELDS", "build", "submit_together"]
