"""Leakage of explicit victims: their round's cases from the product's one pipeline, every
configured attack on each, every finished (victim, attack) in the run's results store.

`fl-sim bench dfleak` and `fl-sim sweep` measure leakage through this module, so a resumed or
sharded run never redoes a (victim, attack) and both report the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from fl_sim.config import ConfigError, ExperimentConfig, parse_config
from fl_sim.results import AttackRecord, RunDirectory
from server.attack_runner import AttackRunner, RunnerEvents


def select_attacks(config: ExperimentConfig, labels: Sequence[str] | None = None,
                   iterations: int | None = None) -> ExperimentConfig:
    """The config with only the attacks labelled `labels` (in the config's order), each run
    for `iterations` when given. The paired-comparison reference falls back to the first
    attack when it was filtered out."""
    tree = config.model_dump(mode="json")
    attacks = tree["attacks"]
    if labels:
        attacks = [a for a in attacks if (a["label"] or a["name"]) in labels]
        if not attacks:
            raise ConfigError(f"attacks {','.join(labels)!r}: none of {[a.key for a in config.attacks]}")
    if iterations:
        for a in attacks:
            a["params"]["iterations"] = iterations
    tree["attacks"] = attacks
    if tree["metrics"]["reference"] not in (None, *[a["label"] or a["name"] for a in attacks]):
        tree["metrics"]["reference"] = None
    return parse_config(tree)


def printing_events(who: Callable[[int], str] = "client {}".format, every: float = 30.0,
                    indent: str = "", name: str = "") -> RunnerEvents:
    """Progress on stdout: each attack as it starts (the victim named by `who`), its loss at
    most every `every` seconds, its metrics when done (after `name`, when given: whose
    results they are)."""
    last = [0.0]

    def on_start(task, total):
        # a batch across runs (a sweep's points) holds the same clients once per run
        victims = ", ".join(who(c) for c in dict.fromkeys(task.together or (task.client,)))
        together = f" ({len(task.together)} victims together)" if task.together else ""
        print(f"{indent}{task.attack.key}{together}: {victims}", flush=True)

    def on_iteration(task, it, total, loss):
        now = time.perf_counter()
        if now - last[0] > every or it == total:
            last[0] = now
            print(f"{indent}    {it}/{total} loss {loss:.4f}", flush=True)

    def on_done(task, rec: AttackRecord):
        print(f"{indent}  {f'{name}: ' if name else ''}{rec.attack} on client {rec.client}: psnr {rec.psnr:.2f} ssim {rec.ssim:.3f} lpips {rec.lpips:.3f} "
              f"id {rec.id_similarity:.3f} rank-1 {rec.id_rank1:.2f} (rank {rec.id_rank:.1f}) labels {rec.label_accuracy:.2f}  "
              f"{rec.seconds:.0f} s", flush=True)

    return RunnerEvents(on_start, on_iteration, on_done)


@dataclass
class LeakageJob:
    """One leakage measurement: a config's attacks on its victims, results in `run`."""

    config: ExperimentConfig
    victims: Sequence[int]
    run: RunDirectory
    name: str = ""  # how progress names it (a sweep's point)


def measure_leakage(config: ExperimentConfig, victims: Sequence[int], run: RunDirectory,
                    events: RunnerEvents | None = None) -> list[tuple[int, int, str, str]]:
    """Attack each victim's update of `config.threat.rounds[0]` with every configured attack,
    skipping what the run already holds. An attack runs on all its pending victims as one
    batch where it can (attacks.multi: same results as one by one, about twice the
    throughput at 4-8 victims); a victim's `seconds` is then its share of the batch's time. Returns the
    failures (round, client, attack, error)."""
    return measure_leakage_together([LeakageJob(config, victims, run)], events)


def measure_leakage_together(jobs: Sequence[LeakageJob], events: RunnerEvents | None = None,
                             max_together: int | None = None, workers: int = 1) -> list[tuple[int, int, str, str]]:
    """`measure_leakage` for several jobs that attack the same global model (a sweep's points:
    one case under different defenses): each attack runs on the pending victims of all jobs
    as one batch (of at most `max_together`) where their cases allow it, each result recorded
    in its own job's run; with `workers` > 1, in that many processes of one thread each
    (server.attack_pool). Returns the failures of all jobs."""
    from fl_sim.federated_data import federated_data, public_set
    from server.attack_runner import submit_together
    from server.cases import identity_gallery, simulate_victims

    parts = []
    for job in jobs:
        config = job.config
        rnd = config.threat.rounds[0]
        done = job.run.done_attacks()
        todo = [pid for pid in job.victims if any((rnd, pid, a.key) not in done for a in config.attacks)]
        if not todo:
            continue
        data = federated_data(config)
        cases = simulate_victims(config, todo, rnd)
        print(f"{f'{job.name}: ' if job.name else ''}{len(todo)} victims x {len(config.attacks)} attacks; "
              f"{cases[0].case.describe()}", flush=True)
        runner = AttackRunner(job.run, config.attacks, config.metrics, config.device, 1,
                              public=public_set(config, data).images,
                              events=events or printing_events(indent="  " if job.name else "", name=job.name),
                              together=True, record_variants=True, gallery=identity_gallery(config, data))
        parts.append((runner, cases))
    if not parts:
        return []
    submit_together(parts, max_together, workers)
    return [f for runner, _ in parts for f in runner.failures]


__all__ = ["select_attacks", "printing_events", "measure_leakage", "measure_leakage_together", "LeakageJob"]
