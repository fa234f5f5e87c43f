"""`fl-sim bench landscape`: the attack's own optimisation, started at the victim's face."""
from __future__ import annotations


def test_landscape_scores_the_truth_and_descends_from_a_blur(tmp_path):
    """The victim's own face matches its update (the objective is its TV term alone: 0.0018
    measured, against 0.19 for the face blurred by 2 px); from the blur the attack lowers the
    objective (0.19 -> 0.11 in 20 steps, measured). The CLI saves the pictures: per victim the
    truth, then each start and its end. A bad --clients, --starts or --param is an error."""
    from PIL import Image

    from benchmarks.landscape import STARTS, main, probe
    from fl_sim.config import load_config

    starts = {k: STARTS[k] for k in ("truth", "blur 2 px")}
    truth, blur = probe(load_config("configs/bench/priors.yaml"), [0], iterations=20, lr=0.01, starts=starts)
    assert truth.start_psnr == 100 and truth.start_objective < 0.01
    assert blur.start_psnr < 30 and blur.start_objective > 10 * truth.start_objective
    assert blur.end_objective < 0.9 * blur.start_objective
    assert truth.start_id_rank == 1
    # the straight path from the blur falls to the face (0.19 -> 0.0018, at every point measured),
    # and reaches the 20 steps' objective before the truth: closer to the face than the blur
    assert blur.line_descends and blur.start_psnr + 1 < blur.line_psnr_at_end < 100
    assert main(["--clients", "0,x"]) == 2
    assert main(["--starts", "blur 3 px"]) == 2
    assert main(["--param", "tvv=1"]) == 2  # an attack setting that does not exist

    grid = tmp_path / "grid.png"
    assert main(["--clients", "0,1", "--starts", "truth,blur 2 px", "--iterations", "2", "--grid", str(grid)]) == 0
    width, height = Image.open(grid).size
    assert (width, height) == (5 * 66 + 2, 2 * 66 + 2)  # 64 px tiles, 2 px padding: 2 victims x (truth + 2 x 2)


def test_path_psnr_is_read_where_the_objective_crosses():
    """Linear in t between the measured points; the start when it already scores that low."""
    from benchmarks.landscape import _path_psnr_at

    ts, values = (0.0, 0.5, 1.0), [1.0, 0.5, 0.1]
    assert _path_psnr_at(0.3, ts, values, lambda t: t) == 0.75
    assert _path_psnr_at(2.0, ts, values, lambda t: t) == 0.0
    assert _path_psnr_at(0.05, ts, values, lambda t: t) == 1.0  # lower than the truth scores: the truth
