"""`fl-sim bench landscape`: the attack's own optimisation, started at the victim's face."""
from __future__ import annotations


def test_landscape_scores_the_truth_and_descends_from_a_blur():
    """The victim's own face matches its update (the objective is its TV term alone: 0.0018
    measured, against 0.19 for the face blurred by 2 px); from the blur the attack lowers the
    objective (0.19 -> 0.11 in 20 steps, measured). A bad --clients is an error."""
    from benchmarks.landscape import STARTS, main, probe
    from fl_sim.config import load_config

    starts = {k: STARTS[k] for k in ("truth", "blur 2 px")}
    truth, blur = probe(load_config("configs/bench/priors.yaml"), [0], iterations=20, lr=0.01, starts=starts)
    assert truth.start_psnr == 100 and truth.start_objective < 0.01
    assert blur.start_psnr < 30 and blur.start_objective > 10 * truth.start_objective
    assert blur.end_objective < 0.9 * blur.start_objective
    assert truth.start_id_rank == 1
    assert main(["--clients", "0,x"]) == 2
