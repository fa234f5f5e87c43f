"""The run directory contract: store, CSV exports, no silent overwrite, the HTML report and its paired
differences."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as st

from fl_sim.config import AttackConfig, ExperimentConfig, MetricsConfig
from fl_sim.report import run_comparisons, write_report
from fl_sim.results import AttackRecord, RoundRecord, RunDirectory, RunExists


def _filled_run(tmp_path, orl64) -> RunDirectory:
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="t"))
    for client in range(2):
        truth = run.save_image(f"r1_c{client}_truth", orl64.images[client * 10][None])
        for attack in ("invertg", "idlg-adam"):
            img = run.save_image(f"r1_c{client}_{attack}", torch.rand(1, 3, 64, 64))
            run.add_attack(AttackRecord(1, client, attack, psnr=12.5 + client, image=img, truth_image=truth))
    for r in (1, 2):
        run.add_round(RoundRecord(r, 0.2 * r, 1.0 / r, 10, 2.0))
    return run


def test_store_exports_csv_and_knows_what_is_done(tmp_path, orl64):
    run = _filled_run(tmp_path, orl64)
    metrics = pd.read_csv(run.path / "metrics.csv")
    assert len(metrics) == 4 and {"round", "client", "attack", "psnr", "ssim", "lpips"} <= set(metrics)
    assert list(pd.read_csv(run.path / "rounds.csv")["test_accuracy"]) == pytest.approx([0.2, 0.4])
    assert (1, 1, "invertg") in run.done_attacks() and run.done_rounds() == {1, 2}
    reopened = RunDirectory.open(run.path)
    assert reopened.done_attacks() == run.done_attacks()
    assert reopened.config().name == "t"


def test_checkpoint_is_one_file_per_round_committed_by_the_store(tmp_path):
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="t"))
    weights = [{"w": torch.full((3,), float(r))} for r in range(4)]
    assert run.checkpoint("last") is None
    for rnd in (1, 2):
        run.save_checkpoint(weights[rnd], rnd, "last", keep=[1])
    rnd, state = run.checkpoint("last")
    assert rnd == 2 and torch.equal(state["w"], weights[2]["w"])
    assert [p.name for p in (run.path / "checkpoints").iterdir()] == ["round-002.pt"]
    # the exports are the same file as the checkpoint (no second write), and hold its weights
    load = lambda p: torch.load(p, weights_only=True)["w"]  # noqa: E731
    assert torch.equal(load(run.path / "global_model.pt"), weights[2]["w"])
    assert torch.equal(load(run.model_path(1)), weights[1]["w"]) and not run.model_path(2).exists()
    assert (run.path / "global_model.pt").stat().st_ino == run.checkpoint_path(2).stat().st_ino
    # killed after writing round 3's weights, before the store recorded the round: a resume
    # starts from round 2's, still on disk
    run.save_model(weights[3], checkpoint=3)
    rnd, state = RunDirectory.open(run.path).checkpoint("last")
    assert rnd == 2 and torch.equal(state["w"], weights[2]["w"])


def test_server_optimiser_state_is_kept_beside_the_checkpoint_not_in_the_model(tmp_path):
    """FedAvgM's velocity is saved with each round (only the last kept) and read back for a
    resume; the model files users load hold the weights alone."""
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="t"))
    for rnd in (1, 2):
        run.save_checkpoint({"w": torch.full((3,), float(rnd))}, rnd, "last",
                            server_state={"w": torch.full((3,), 10.0 * rnd)})
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["round-002.pt", "server-002.pt"]
    reopened = RunDirectory.open(run.path)
    assert torch.equal(reopened.checkpoint_server_state(2)["w"], torch.full((3,), 20.0))
    assert reopened.checkpoint_server_state(1) == {}
    assert set(torch.load(run.path / "global_model.pt", weights_only=True)) == {"w"}


def test_existing_run_is_never_overwritten(tmp_path, orl64):
    _filled_run(tmp_path, orl64)
    with pytest.raises(RunExists, match="--resume"):
        RunDirectory.create(tmp_path / "run", ExperimentConfig(name="other"))
    assert RunDirectory.open(tmp_path / "run").config().name == "t"


def test_report_inlines_every_reconstruction_and_the_curves(tmp_path, orl64):
    run = _filled_run(tmp_path, orl64)
    html = write_report(run).read_text()
    # 2 victims x (truth + 2 attacks) + accuracy curve + leakage curve
    assert html.count("data:image/png;base64,") == 2 * 3 + 2
    assert "invertg" in html and "idlg-adam" in html and "13.50" in html


# -- paired differences in the report --------------------------------------------------

# 4 victims; dfleak minus invertg: PSNR +2, +1.5, +0.05 (a tie), +3; LPIPS -0.2, -0.05, +0.01, -0.2
_PSNR = {"invertg": [10.0, 12.0, 11.0, 13.0], "dfleak": [12.0, 13.5, 11.05, 16.0]}
_LPIPS = {"invertg": [0.5, 0.4, 0.45, 0.6], "dfleak": [0.3, 0.35, 0.46, 0.4]}


def _paired_run(tmp_path, **metrics) -> RunDirectory:
    config = ExperimentConfig(name="paired", attacks=[AttackConfig(name="invertg"), AttackConfig(name="dfleak")],
                              metrics=MetricsConfig(**metrics))
    run = RunDirectory.create(tmp_path / "run", config)
    for client in range(4):
        # dfleak is stored first and sorts first: the reference must still come from the config
        for attack in ("dfleak", "invertg"):
            run.add_attack(AttackRecord(1, client, attack, psnr=_PSNR[attack][client],
                                        lpips=_LPIPS[attack][client]))
    return run


def _expected_cell(method: list[float], reference: list[float], digits: int) -> str:
    d = np.array(method) - np.array(reference)
    mean = d.mean()
    low, high = st.t.interval(0.95, df=len(d) - 1, loc=mean, scale=d.std(ddof=1) / np.sqrt(len(d)))
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def test_report_has_paired_differences_against_the_first_configured_attack(tmp_path):
    run = _paired_run(tmp_path)
    html = write_report(run).read_text()
    assert "Paired differences against invertg" in html
    psnr_row = ("<td>dfleak</td><td>psnr</td><td>4</td>"
                f"<td>{_expected_cell(_PSNR['dfleak'], _PSNR['invertg'], 2)}</td><td>3/1/0</td>")
    lpips_row = ("<td>dfleak</td><td>lpips</td><td>4</td>"
                 f"<td>{_expected_cell(_LPIPS['dfleak'], _LPIPS['invertg'], 3)}</td><td>3/0/1</td>")
    assert psnr_row in html and lpips_row in html
    assert "<td>ssim</td>" not in html and "<td>id_similarity</td>" not in html  # never measured here
    comps = run_comparisons(run)
    assert [(c.method, c.reference, c.metric, c.n) for c in comps] == [("dfleak", "invertg", "psnr", 4),
                                                                       ("dfleak", "invertg", "lpips", 4)]
    assert comps[0].mean_difference == pytest.approx(1.6375)


def test_configured_reference_wins_and_a_wrong_one_is_reported_not_fatal(tmp_path):
    run = _paired_run(tmp_path, reference="dfleak")
    html = write_report(run).read_text()
    assert "Paired differences against dfleak" in html
    assert f"<td>{_expected_cell(_PSNR['invertg'], _PSNR['dfleak'], 2)}</td><td>0/1/3</td>" in html

    bad = _paired_run(tmp_path / "bad", reference="idlg")
    html = write_report(bad).read_text()
    assert "Paired differences against idlg" in html and "dfleak, invertg" in html
    with pytest.raises(ValueError, match="'idlg'"):
        run_comparisons(bad)


def test_no_paired_section_without_two_attacks_on_a_victim(tmp_path):
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="one"))
    for client, attack in enumerate(("invertg", "dfleak")):  # two attacks, never on the same victim
        run.add_attack(AttackRecord(1, client, attack, psnr=10.0))
    assert "Paired differences" not in write_report(run).read_text()
    assert run_comparisons(run) == []


def test_report_states_the_local_dp_epsilon_of_a_gaussian_defense(tmp_path):
    from fl_sim.config import DefenseConfig, FederationConfig
    from fl_sim.defenses import build_defenses

    defense = DefenseConfig(name="gaussian", params={"noise_multiplier": 1.5, "max_norm": 2.0})
    config = ExperimentConfig(name="dp", defenses=[defense],
                              federation=FederationConfig(num_clients=100, clients_per_round=10, rounds=20))
    html = write_report(RunDirectory.create(tmp_path / "run", config)).read_text()
    (gaussian,) = build_defenses([defense])
    assert f"epsilon {gaussian.epsilon(20):.3g} at delta 1e-05 for a client in all 20 rounds" in html
    assert f"{gaussian.epsilon(2):.3g} for 2 (the expected participations)" in html
    assert "Privacy:" not in write_report(RunDirectory.create(tmp_path / "plain",
                                                                                ExperimentConfig(name="p"))).read_text()


def test_report_says_which_model_was_attacked(tmp_path):
    """An audit of a trained model and one of an untrained model read alike otherwise; the
    leakage of the two differs by several dB (docs/measurements.md, "Leakage from the trained model")."""
    from fl_sim.config import ModelConfig

    trained = ExperimentConfig(name="t", model=ModelConfig(name="resnet18", weights="runs/demo-train/global_model.pt"))
    html = write_report(RunDirectory.create(tmp_path / "trained", trained)).read_text()
    assert "starting from the trained weights runs/demo-train/global_model.pt" in html
    assert "starting untrained" in write_report(RunDirectory.create(tmp_path / "new", ExperimentConfig(name="u"))).read_text()


def test_report_of_an_attack_on_a_trained_model_shows_how_it_was_trained(tmp_path):
    """`make demo`'s audit attacks the model another run trained: its report carries that run's
    accuracy curve and names the round and accuracy of the attacked model."""
    from fl_sim.config import ModelConfig

    train = tmp_path / "train"
    (train / "models").mkdir(parents=True)
    pd.DataFrame({"round": [1, 2, 3, 4], "test_accuracy": [0.025, 0.3, 0.6, 0.85]}).to_csv(train / "rounds.csv", index=False)
    for weights, shown in [(train / "global_model.pt", "round 4's (85.0 %)"),
                           (train / "models" / "round-002.pt", "round 2's (30.0 %)")]:
        weights.touch()
        config = ExperimentConfig(name="audit", model=ModelConfig(name="resnet18", weights=str(weights)))
        html = write_report(RunDirectory.create(tmp_path / weights.stem, config)).read_text()
        assert f"The federation that trained the attacked model ({train})" in html
        assert f"the attacked model is {shown}" in html
    (train / "rounds.csv").unlink()  # the training run is gone: the report still renders, without it
    html = write_report(RunDirectory.create(tmp_path / "gone", config)).read_text()
    assert "The federation that trained" not in html


def test_a_saved_model_file_names_its_run_and_round(tmp_path):
    run = RunDirectory.create(tmp_path / "run", ExperimentConfig(name="r"))
    assert RunDirectory.of_model(run.model_path(7)) == (run.path, 7)
    assert RunDirectory.of_model(run.path / "global_model.pt") == (run.path, None)
    assert RunDirectory.of_model(tmp_path / "mine.pt") is None
    assert RunDirectory.of_model(tmp_path / "round-007.pt") is None  # not under a run's models/
