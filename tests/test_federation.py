"""The federation end to end: 100 simulated Flower clients (Ray and in-process), the
honest-but-curious server's cases, reproducible sampling, kill and resume.

The easy task: 4 synthetic identities (DCGAN faces, 60 images each) split iid, a LeNet with
the DLG papers' uniform(-0.5, 0.5) initialisation (the default one barely trains).
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fl_sim.config import ExperimentConfig, parse_config
from fl_sim.results import RunDirectory

TESTS = Path(__file__).resolve().parent
COUNT_ATTACK = "fedtest-count"


# ---------------------------------------------------------------------------------------
# A trivial, deterministic attack that logs every invocation (registered in the test
# process and in the child processes of the resume test).


@dataclass
class CountConfig:
    log: str = ""
    delay: float = 0.0


def register_count_attack() -> None:
    from attacks.base import Attack, AttackResult
    from attacks.registry import ATTACKS, register_attack

    if COUNT_ATTACK in ATTACKS:
        return

    @register_attack(COUNT_ATTACK)
    class CountAttack(Attack):
        Config = CountConfig

        def run(self, case, progress=None, stop=None, device="cpu"):
            t0 = time.perf_counter()
            if self.config.log:
                with open(self.config.log, "a") as fh:
                    fh.write(f"{case.meta['round']} {case.meta['client']}\n")
            end = t0 + self.config.delay
            while time.perf_counter() < end and not (stop is not None and stop.is_set()):
                time.sleep(0.02)
            norm = sum(float(v.double().pow(2).sum()) for v in case.update.values()) ** 0.5
            n, (c, h, w) = case.num_images, case.image_shape
            images = torch.full((n, c, h, w), 1.0 / (1.0 + norm))
            images[..., : h // 2, :] = 0.25
            labels = torch.zeros(n, dtype=torch.long)
            return AttackResult(images, labels, [norm], 1, time.perf_counter() - t0, final_loss=norm)


def register_failing_attack() -> None:
    from attacks.base import Attack
    from attacks.registry import ATTACKS, register_attack

    if "fedtest-fail" in ATTACKS:
        return

    @register_attack("fedtest-fail")
    class FailingAttack(Attack):
        Config = CountConfig

        def run(self, case, progress=None, stop=None, device="cpu"):
            raise RuntimeError("this attack always fails")


def _child(argv: list[str]) -> None:
    """Entry of the resume test's child processes: `fl-sim` with the test attack."""
    register_count_attack()
    from fl_sim.cli import main

    sys.exit(main(argv))


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_init(tmp_path_factory) -> str:
    from fl_sim.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet", 4)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    path = tmp_path_factory.mktemp("weights") / "lenet4.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def easy_config(lenet_init: str, **sections) -> dict:
    tree = {
        "name": "fedtest",
        "seed": 0,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 60}},
        "model": {"name": "lenet", "weights": lenet_init},
        "federation": {"num_clients": 100, "clients_per_round": 10, "rounds": 3, "algorithm": "fedavg",
                       "batch_size": 2, "local_lr": 0.05, "local_steps": 4, "partitioning": "iid"},
        "threat": {"victims": {"mode": "sampled", "k": 2}, "rounds": [1]},
        "attacks": [],
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def run_tree(tree: dict, out: Path) -> RunDirectory:
    from server.launcher import run_experiment

    config = parse_config(tree)
    run = RunDirectory.create(out, config)
    run_experiment(config, run, resume=False)
    return RunDirectory.open(out)


def acc_of_round(rounds: pd.DataFrame, rnd: int) -> float:
    return float(rounds.loc[rounds["round"] == rnd, "test_accuracy"].iloc[0])


def _ray_children() -> list[str]:
    """Processes with 'ray' in their command line whose parent is this process."""
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and "ray" in cmd:
            found.append(cmd[:80])
    return found


DETERMINISTIC_ROUND_COLUMNS = ["round", "test_accuracy", "test_loss", "clients", "train_loss", "sampled"]
DETERMINISTIC_ATTACK_COLUMNS = ["round", "client", "attack", "psnr", "mse", "ssim", "label_accuracy",
                                "iterations", "num_images", "final_loss", "image", "truth_image"]


# ---------------------------------------------------------------------------------------


def test_ray_federation_learns_and_matches_inprocess(tmp_path, lenet_init):
    """100 clients under Flower's Ray engine: accuracy rises; the same clients are sampled,
    the same weights result and the same attacks run as on the in-process grid; Ray is gone."""
    import ray

    tree = easy_config(lenet_init, federation={"rounds": 8, "save_rounds": [4]},
                       attacks=[{"name": "invertg", "params": {"iterations": 4}}],
                       engine={"backend": "ray", "client_num_cpus": 1, "attack_parallelism": 2})
    ray_run = run_tree(tree, tmp_path / "ray")
    assert not ray.is_initialized()
    assert _ray_children() == []

    # One victim at a time in-process too, as the Ray tasks attack them (the batched path is
    # compared with this one in test_attack_runner.py).
    local = run_tree({**tree, "engine": {"backend": "inprocess", "attack_together": False}}, tmp_path / "local")

    r_ray, r_loc = ray_run.rounds_frame(), local.rounds_frame()
    assert len(r_ray) == 8 and (r_ray.clients == 10).all()
    assert list(r_ray.sampled) == list(r_loc.sampled)
    assert r_ray.test_accuracy.tolist() == pytest.approx(r_loc.test_accuracy.tolist(), abs=1e-6)
    acc = r_ray.test_accuracy.tolist()
    assert max(acc[-3:]) >= 0.75 and sum(acc[-3:]) / 3 > sum(acc[:3]) / 3 + 0.2, acc

    m_ray, m_loc = ray_run.metrics_frame(), local.metrics_frame()
    assert len(m_ray) == 2 and (m_ray["round"] == 1).all()
    assert list(m_ray.client) == list(m_loc.client)
    # The same attack on the same case, in a Ray task (1 thread) and in this process (its own
    # thread count): equal here to the last digit; 0.05 dB leaves room for another CPU's
    # kernels to sum in another order under a different thread count (4 signed steps can
    # flip the sign of a few near-zero pixel gradients: ~3e-4 dB each at 32 px).
    assert m_ray.psnr.tolist() == pytest.approx(m_loc.psnr.tolist(), abs=0.05)
    for rel in list(m_ray.image) + list(m_ray.truth_image):
        assert (ray_run.path / rel).is_file()
    assert (ray_run.path / "report.html").is_file()
    assert (ray_run.path / ".flwr").is_dir()

    # The saved global models are what `model.weights` loads: the last one scores the last
    # round's accuracy; the round-4 one the fourth's; no other round is kept.
    from fl_sim.federated_data import build_federated_data
    from fl_sim.models import build_model
    from fl_sim.training import evaluate

    test = build_federated_data(parse_config(tree)).test_set()
    assert sorted(p.name for p in (ray_run.path / "models").iterdir()) == ["round-004.pt"]
    for weights, rnd in ((ray_run.path / "global_model.pt", 8), (ray_run.path / "models" / "round-004.pt", 4)):
        acc, _ = evaluate(build_model("lenet", 4, weights), test.normalise(test.images), test.labels)
        assert acc == pytest.approx(acc_of_round(r_ray, rnd), abs=1e-9)



@pytest.mark.parametrize("model, defenses", [("mobilenet_v2", []),
                                             ("resnet18", [{"name": "soteria", "params": {"rate": 0.8, "probes": 8}}])])
def test_inprocess_clients_in_threads_equal_one_by_one(tmp_path, model, defenses):
    """The in-process grid trains two clients at once in threads: the same sampled clients,
    losses, accuracies and global weights as one by one, for MobileNetV2, whose dropout draws
    from torch's global generator, and under Soteria, whose probes use forward-mode AD (both
    process-wide state: such clients take turns there)."""
    tree = {
        "defenses": defenses,
        "name": "threads", "seed": 2,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 30}},
        "model": {"name": model},
        "federation": {"num_clients": 20, "clients_per_round": 4, "rounds": 2, "algorithm": "fedavg",
                       "batch_size": 2, "local_lr": 0.01, "local_steps": 2, "partitioning": "iid",
                       "bn_mode": "eval"},
        "threat": {"rounds": []}, "attacks": [],
        "metrics": {"lpips": False, "id_backend": None},
    }
    runs = {w: run_tree({**tree, "engine": {"backend": "inprocess", "inprocess_workers": w}}, tmp_path / f"w{w}")
            for w in (1, 2)}
    one, two = (runs[w].rounds_frame()[["sampled", "train_loss", "test_accuracy", "test_loss"]] for w in (1, 2))
    assert one["train_loss"].notna().all()
    pd.testing.assert_frame_equal(one, two)
    a, b = (torch.load(runs[w].path / "global_model.pt", weights_only=True) for w in (1, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_victim_case_holds_the_victims_update(tmp_path, lenet_init, algorithm):
    """The server's case carries the update the victim's data gives (FedSGD gradient; FedAvg
    weight difference), as the attacker's model of the client recomputes it; labels only
    when clients send them."""
    from attacks.case import AttackCase
    from attacks.engine import VictimModel

    labels_known = algorithm == "fedsgd"
    tree = easy_config(lenet_init, federation={"rounds": 1, "algorithm": algorithm, "batch_size": 2},
                       threat={"victims": {"mode": "sampled", "k": 2}, "rounds": [1], "save_cases": True,
                               "labels_known": labels_known})
    run = run_tree(tree, tmp_path / algorithm)
    cases = sorted(p for p in (run.path / "cases").glob("r1_c*.pt") if not p.name.endswith("_truth.pt"))
    assert len(cases) == 2
    for path in cases:
        case = AttackCase.load(path)
        truth = torch.load(path.with_name(path.stem + "_truth.pt"), weights_only=True)
        x, y = truth["images"], truth["labels"]
        assert case.num_images == len(x) and case.image_shape == (3, 32, 32)
        assert case.update_kind == ("gradient" if algorithm == "fedsgd" else "weight-diff")
        if labels_known:
            assert torch.equal(case.labels, y)
        else:
            assert case.labels is None
        if algorithm == "fedsgd":
            model = case.build_model()
            names = [n for n, _ in model.named_parameters()]
            assert list(case.update) == names
            loss = F.cross_entropy(model((x - 0.5) / 0.5), y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for name, g in zip(names, grads):
                torch.testing.assert_close(case.update[name], g, rtol=1e-5, atol=1e-7)
        simulated = VictimModel(case).simulate(x, y, create_graph=False)
        for name, s in zip(case.parameter_names(), simulated):
            torch.testing.assert_close(case.update[name], s.detach(), rtol=1e-4, atol=1e-6)

    if algorithm == "fedsgd":  # a saved case attacked offline (`fl-sim attack`), truth found beside it
        from server.offline import attack_case_file

        register_count_attack()
        offline = attack_case_file(cases[0], COUNT_ATTACK, ["delay=0"], tmp_path / "offline")
        frame = RunDirectory.open(offline.path).metrics_frame()
        assert len(frame) == 1 and frame.psnr.notna().all() and frame.truth_image.iloc[0]


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_batchnorm_client_and_attacker_agree(tmp_path, bn_mode):
    """ResNet18 at 64 px, FedSGD at batch size 1: the update the client sends is the one the
    attacker's model of the client computes, with BatchNorm on batch statistics (train) or
    frozen (eval); frozen BatchNorm leaves the global running statistics unchanged."""
    from attacks.case import AttackCase
    from attacks.engine import VictimModel

    tree = {"name": "bn", "data": {"name": "orl", "image_size": 64}, "model": {"name": "resnet18"},
            "federation": {"num_clients": 100, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd",
                           "batch_size": 1, "bn_mode": bn_mode},
            "threat": {"victims": {"mode": "sampled", "k": 1}, "rounds": [1], "save_cases": True},
            "engine": {"backend": "inprocess"}, "metrics": {"lpips": False, "id_backend": None}}
    run = run_tree(tree, tmp_path / bn_mode)
    [path] = [p for p in (run.path / "cases").glob("r1_c*.pt") if not p.name.endswith("_truth.pt")]
    case = AttackCase.load(path)
    truth = torch.load(path.with_name(path.stem + "_truth.pt"), weights_only=True)
    assert case.bn_mode == bn_mode and case.grey
    simulated = VictimModel(case).simulate(truth["images"], truth["labels"], create_graph=False)
    for name, s in zip(case.parameter_names(), simulated):
        torch.testing.assert_close(case.update[name], s.detach(), rtol=1e-4, atol=1e-6)
    from server.federation import STATE_ROUND

    _, after = run.checkpoint(STATE_ROUND)
    moved = not torch.allclose(after["bn1.running_mean"], case.weights["bn1.running_mean"])
    assert moved == (bn_mode == "train")


def test_same_seed_same_clients_and_metrics(tmp_path, lenet_init):
    register_count_attack()
    tree = easy_config(lenet_init, federation={"rounds": 3, "algorithm": "fedsgd", "batch_size": 1,
                                               "server_lr": 0.1},
                       threat={"victims": {"mode": "sampled", "k": 2}, "rounds": [1, 3]},
                       attacks=[{"name": COUNT_ATTACK}])
    a = run_tree(tree, tmp_path / "a")
    b = run_tree(tree, tmp_path / "b")
    c = run_tree({**tree, "seed": 1}, tmp_path / "c")
    ra, rb = a.rounds_frame(), b.rounds_frame()
    pd.testing.assert_frame_equal(ra[DETERMINISTIC_ROUND_COLUMNS], rb[DETERMINISTIC_ROUND_COLUMNS])
    pd.testing.assert_frame_equal(a.metrics_frame()[DETERMINISTIC_ATTACK_COLUMNS],
                                  b.metrics_frame()[DETERMINISTIC_ATTACK_COLUMNS])
    assert len(a.metrics_frame()) == 4
    assert list(ra.sampled) != list(c.rounds_frame().sampled)


def _attack_rows(db: Path, round_: int) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM attacks WHERE round = ?", (round_,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not there yet
        return 0


def _fl_sim(args: list[str]) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_federation as t; "
            "t._child(sys.argv[1:])")
    return [sys.executable, "-c", code, *args]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsgd"])
def test_server_momentum_steps_as_fedavgm(algorithm):
    """federation.server_momentum: v <- m v + d, w <- w - lr v over the parameters, d the mean
    gradient (FedSGD) or the global weights minus the clients' mean (FedAvg); BatchNorm buffers
    are the clients' mean."""
    from flwr.app import Array, ArrayRecord

    from server.strategy import CuriousFedAvg

    config = ExperimentConfig(federation={"algorithm": algorithm, "server_momentum": {"lr": 0.5, "momentum": 0.9}})
    strategy = CuriousFedAvg(config, {}, [], ["w"])

    def record(w, bn):
        return ArrayRecord({"w": Array(np.array(w, dtype=np.float32)), "bn": Array(np.array(bn, dtype=np.float32))})

    w0, means = np.array([1.0, -2.0]), [np.array([0.5, 0.0]), np.array([0.25, 1.0])]
    strategy.global_arrays = record(w0, [0.0])
    first = strategy.server_step(record(means[0], [3.0]))
    d0 = means[0] if algorithm == "fedsgd" else w0 - means[0]
    w1 = w0 - 0.5 * d0
    np.testing.assert_allclose(first["w"].numpy(), w1, rtol=1e-6)
    assert first["bn"].numpy().tolist() == [3.0]
    strategy.global_arrays = first
    second = strategy.server_step(record(means[1], [4.0]))
    d1 = means[1] if algorithm == "fedsgd" else w1 - means[1]
    np.testing.assert_allclose(second["w"].numpy(), w1 - 0.5 * (0.9 * d0 + d1), rtol=1e-6)
    assert set(strategy.velocity) == {"w"}  # buffers carry no velocity


@pytest.mark.parametrize("momentum", [None, {"lr": 0.1, "momentum": 0.9}], ids=["plain", "server-momentum"])
def test_kill_and_resume(tmp_path, lenet_init, momentum):
    """Kill a run after round 2's first attack is stored, resume it: finished attacks are
    not redone and the final metrics equal an uninterrupted run's (with server momentum too:
    its velocity after round 1 is restored, not restarted)."""
    import yaml

    log_killed, log_clean = tmp_path / "killed.log", tmp_path / "clean.log"

    def write_config(name: str, log: Path) -> Path:
        tree = easy_config(lenet_init, federation={"rounds": 4, "algorithm": "fedsgd", "batch_size": 1,
                                                   "server_lr": 0.1, "server_momentum": momentum},
                           threat={"victims": {"mode": "sampled", "k": 2}, "rounds": [1, 2, 3]},
                           attacks=[{"name": COUNT_ATTACK, "params": {"log": str(log), "delay": 1.0}}])
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(_fl_sim(["run", str(write_config("killed", log_killed)), "--out", str(out)]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while _attack_rows(out / "results.sqlite", 2) < 1:
            assert child.poll() is None, child.stdout.read().decode()
            assert time.time() < deadline, "no round-2 attack record in time"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    killed = RunDirectory.open(out)
    done_before = killed.done_attacks()
    rounds_before = killed.done_rounds()
    killed.close()
    assert {r for r, _, _ in done_before} == {1, 2} and len(done_before) < 6
    assert rounds_before == {1}

    resumed = subprocess.run(_fl_sim(["run", "--resume", str(out)]), capture_output=True, text=True, env=env,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after round 1" in resumed.stdout

    clean_out = tmp_path / "clean"
    clean = subprocess.run(_fl_sim(["run", str(write_config("clean", log_clean)), "--out", str(clean_out)]),
                           capture_output=True, text=True, env=env, timeout=180)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # No finished attack was started again.
    starts = [tuple(int(v) for v in line.split()) for line in log_killed.read_text().splitlines()]
    for rnd, client, _ in done_before:
        assert starts.count((rnd, client)) == 1, (rnd, client, starts)
    assert len(set(starts)) == 6

    # The resumed run's CSVs equal the uninterrupted run's (timings aside).
    m_res = pd.read_csv(out / "metrics.csv")[DETERMINISTIC_ATTACK_COLUMNS]
    m_clean = pd.read_csv(clean_out / "metrics.csv")[DETERMINISTIC_ATTACK_COLUMNS]
    pd.testing.assert_frame_equal(m_res, m_clean)
    r_res = pd.read_csv(out / "rounds.csv")[DETERMINISTIC_ROUND_COLUMNS]
    r_clean = pd.read_csv(clean_out / "rounds.csv")[DETERMINISTIC_ROUND_COLUMNS]
    pd.testing.assert_frame_equal(r_res, r_clean)
    assert len(r_res) == 4 and len(m_res) == 6


def test_failing_attack_does_not_end_the_federation(tmp_path, lenet_init):
    register_count_attack()
    register_failing_attack()
    tree = easy_config(lenet_init, federation={"rounds": 2},
                       attacks=[{"name": "fedtest-fail"}, {"name": COUNT_ATTACK}])
    run = run_tree(tree, tmp_path / "fail")
    assert len(run.rounds_frame()) == 2
    frame = run.metrics_frame()
    assert set(frame.attack) == {COUNT_ATTACK} and len(frame) == 2


def test_central_dp_wraps_the_strategy_and_the_server_still_sees_raw_updates(tmp_path, lenet_init):
    """Flower's server-side fixed-clipping wrapper: without noise and with a bound no update
    reaches it, the run is the plain FedAvg run; with a small bound and noise the model
    differs, the attacked cases still hold the raw (unclipped) updates, the report states the
    epsilon, and central DP on FedSGD is refused."""
    from attacks.case import AttackCase
    from fl_sim.config import ConfigError

    base = easy_config(lenet_init, federation={"rounds": 2},
                       threat={"victims": {"mode": "sampled", "k": 2}, "rounds": [1], "save_cases": True})
    plain = run_tree(base, tmp_path / "plain").rounds_frame()
    transparent = run_tree(easy_config(lenet_init, federation={"rounds": 2, "central_dp": {
        "noise_multiplier": 0.0, "clipping_norm": 1e6}}), tmp_path / "transparent").rounds_frame()
    pd.testing.assert_frame_equal(plain[DETERMINISTIC_ROUND_COLUMNS], transparent[DETERMINISTIC_ROUND_COLUMNS])

    tree = {**base, "federation": {**base["federation"], "central_dp": {"noise_multiplier": 1.0,
                                                                         "clipping_norm": 0.01}}}
    noisy = run_tree(tree, tmp_path / "noisy")
    assert not np.allclose(noisy.rounds_frame()["test_loss"], plain["test_loss"])
    for path in (noisy.path / "cases").glob("r1_c*.pt"):
        if path.name.endswith("_truth.pt"):
            continue
        case = AttackCase.load(path)
        norm = float(torch.sqrt(sum(v.pow(2).sum() for v in case.update.values())))
        assert norm > 0.05, norm  # far above the bound: the update as it arrived, not clipped
    assert "epsilon" in (noisy.path / "report.html").read_text()
    with pytest.raises(ConfigError, match="central_dp.*fedavg"):
        parse_config(easy_config(lenet_init, federation={"algorithm": "fedsgd", "central_dp": {}}))


def test_the_demo_audits_the_federation_it_trained():
    """`make demo` trains with configs/demo-train.yaml, then attacks with configs/demo.yaml from
    the trained weights: the audit must face the same clients holding the same faces, the
    same held-out test set and the same network, or its report describes another federation."""
    from fl_sim.config import load_config
    from fl_sim.federated_data import build_federated_data

    root = TESTS.parent / "configs"
    train, audit = load_config(root / "demo-train.yaml"), load_config(root / "demo.yaml")
    assert (train.federation.algorithm, audit.federation.algorithm) == ("fedavg", "fedsgd")
    assert train.model == audit.model and train.data == audit.data
    a, b = build_federated_data(train), build_federated_data(audit)
    np.testing.assert_array_equal(a.test, b.test)
    assert len(a.partitions) == len(b.partitions) == 100
    for pa, pb in zip(a.partitions, b.partitions):
        np.testing.assert_array_equal(pa, pb)
