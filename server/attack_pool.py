"""Attack work in worker processes of one thread each: how a sweep's leakage side uses both
cores of a small machine.

One process with two threads runs a batched InvertG at 36.8 victim-it/s (ResNet18, 64 px,
26 victims, BatchNorm on batch statistics); two processes of one thread each, each on its own
batch, run at 70.7 together (`fl-sim bench attack --ray-workers 1 2 --victims 26`): a large
batch leaves a second thread half idle. (Small batches gain less: 8 victims of the DFLeak
bench, 2.5 minutes as two batches of 4 in two processes, 2.8 as one batch in one.)

So work is handed out as whole jobs (one attack on one victim, or on a batch of victims),
largest first, to `workers` spawned processes. They return the raw results; the parent
scores and records them (it owns the run directories) and forwards each job's progress to the
runner's events. multiprocessing's Pool rather than Ray: it is local, needs no cluster start,
and `terminate()` ends work in progress at once when the run is stopped (nothing unfinished
is recorded; a resume redoes it).
"""
from __future__ import annotations

import queue as queue_lib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_WORKER: dict[str, Any] = {}  # this worker process's public set and progress queue


@dataclass(frozen=True)
class PoolJob:
    """One job for a worker: an attack config on its cases (several: one batch)."""

    attack: Any  # fl_sim.config.AttackConfig
    cases: list[Any]  # attacks.case.AttackCase


def _start_worker(public: torch.Tensor | None, progress: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(public=public, progress=progress)


def _run_job(job_id: int, job: PoolJob, device: str) -> list[Any]:
    """In a worker: the job's attack results, one per case, with its progress on the queue
    (at most one message a second, and the last iteration)."""
    from attacks.base import CallbackProgress
    from attacks.multi import MultiVictimInversion
    from server.attack_runner import build

    progress_queue = _WORKER["progress"]
    attack = build(job.attack, _WORKER["public"])
    progress_queue.put((job_id, "start", int(getattr(attack.config, "iterations", 0) or 0), 0, 0.0))
    last = [0.0]

    def report(it: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if now - last[0] >= 1.0 or it == total:
            last[0] = now
            progress_queue.put((job_id, "iteration", int(it), int(total), float(loss)))

    progress = CallbackProgress(report)
    if len(job.cases) > 1:
        return MultiVictimInversion(attack).run(job.cases, progress, None, device)
    return [attack.run(job.cases[0], progress=progress, device=device)]


class AttackPool:
    """`workers` spawned processes of `threads` threads each, running `PoolJob`s."""

    def __init__(self, workers: int, threads: int, public: torch.Tensor | None) -> None:
        from multiprocessing import get_context

        context = get_context("spawn")  # fork would copy a parent with OpenMP threads running
        self.progress = context.Queue()
        self.pool = context.Pool(workers, initializer=_start_worker, initargs=(public, self.progress, threads))

    def run(self, jobs: Sequence[PoolJob], device: str, on_progress, on_result, should_stop) -> bool:
        """Run every job; `on_progress(job_id, kind, a, b, loss)` for each progress message,
        `on_result(job_id, results | exception)` as each job ends (in this thread). Returns
        False when `should_stop()` ended it early (work in progress dropped)."""
        pending = {i: self.pool.apply_async(_run_job, (i, job, device)) for i, job in enumerate(jobs)}
        while pending:
            if should_stop():
                return False
            self._drain(on_progress, wait=0.2)
            for i in [i for i, r in pending.items() if r.ready()]:
                try:
                    outcome = pending.pop(i).get()
                except Exception as exc:  # noqa: BLE001 - the job's own failure, reported per victim
                    outcome = exc
                on_result(i, outcome)
        self._drain(on_progress, wait=0.0)
        return True

    def _drain(self, on_progress, wait: float) -> None:
        """Every progress message waiting (after up to `wait` seconds for the first)."""
        try:
            message = self.progress.get(timeout=wait) if wait else self.progress.get_nowait()
            while True:
                on_progress(*message)
                message = self.progress.get_nowait()
        except queue_lib.Empty:
            pass

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> "AttackPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AttackPool", "PoolJob"]
