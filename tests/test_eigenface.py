"""The similarity-only attacks (attacks/eigenfaces.py, attacks/score_search.py,
attacks/blackbox.py): the basis learns faces, the search is elitist, keeps its budget to the
query, counts as the service counts, and resumes to the same result."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from attacks.blackbox import BLACKBOX, build_blackbox
from attacks.eigenfaces import EigenfaceBasis, EigenfaceTrainConfig, mirror, public_faces, train_eigenfaces
from attacks.oracle import InProcessOracle
from attacks.score_search import BlobDirections, EigenDirections, SearchConfig, best_at, search

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return public_faces(700, size=112, seed=0)


@pytest.fixture(scope="module")
def basis(faces) -> EigenfaceBasis:
    return train_eigenfaces(faces[:600], EigenfaceTrainConfig(components=64, iterations=20, batch=128))


@pytest.fixture(scope="module")
def orl() -> tuple[torch.Tensor, np.ndarray]:
    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name="orl", image_size=112))
    return ds.images, ds.identities.numpy()


def test_a_trained_basis_reconstructs_held_out_faces_better_than_a_random_one(faces, basis, tmp_path):
    held_out = faces[600:]
    trained = (basis.reconstruct(held_out) - held_out).pow(2).mean()
    g = torch.Generator().manual_seed(0)
    random = EigenfaceBasis(basis.mean, torch.randn(basis.components.shape, generator=g) * 0.01)
    baseline = (random.reconstruct(held_out) - held_out).pow(2).mean()
    mean_only = (basis.mean - held_out).pow(2).mean()
    assert trained < 0.5 * baseline, (trained, baseline)
    assert baseline < mean_only  # a random basis still helps a little; the learned one far more
    # saved and loaded, it decodes the same
    sha = basis.save(tmp_path / "b.pt")
    assert len(sha) == 64
    again = EigenfaceBasis.load(tmp_path / "b.pt")
    z = torch.randn(3, basis.k, generator=g)
    assert torch.allclose(again.decode(z), basis.decode(z))


def test_training_resumes_from_its_checkpoint(faces, tmp_path):
    config = EigenfaceTrainConfig(components=16, iterations=12, batch=64)
    whole = train_eigenfaces(faces[:200], config)
    ckpt = tmp_path / "train.ckpt"
    short = EigenfaceTrainConfig(components=16, iterations=12, batch=64)

    class Stop(Exception):  # a kill after step 6, through the progress hook
        pass

    def stop_at_six(step, total, loss):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train_eigenfaces(faces[:200], short, progress=stop_at_six, checkpoint=ckpt, checkpoint_every=3)
    resumed = train_eigenfaces(faces[:200], short, checkpoint=ckpt, checkpoint_every=3)
    assert torch.allclose(resumed.components, whole.components, atol=1e-6)


def test_soft_symmetry_and_blobs_are_what_they_claim():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(mirror(mirror(x)), x)
    blobs = BlobDirections(32).sample(6, torch.Generator().manual_seed(0), best=0.3)
    assert torch.allclose(blobs, blobs.flip(-1), atol=1e-6)  # symmetric
    assert torch.equal(blobs[:, 0], blobs[:, 1]) and torch.equal(blobs[:, 1], blobs[:, 2])  # grey
    peak = blobs.abs().amax(dim=(1, 2, 3))
    assert ((peak >= 0.01 - 1e-6) & (peak <= 0.02 + 1e-6)).all()  # the published amplitudes
    wide = BlobDirections(32).sample(1, torch.Generator().manual_seed(1), best=0.0)
    narrow = BlobDirections(32).sample(1, torch.Generator().manual_seed(1), best=0.9)
    assert (wide.abs() > 0.005).sum() > (narrow.abs() > 0.005).sum()  # shrinking as similarity rises


@pytest.mark.parametrize("step", ["best", "gradient"])
def test_search_climbs_and_resumes_to_the_same_result(basis, orl, tmp_path, step):
    images, ids = orl
    config = SearchConfig(budget=700, batch=32, lr=0.05, lr_late=0.02, lr_switch=10, starts=2, start_iterations=3,
                          checkpoint_every=2, step=step, probe_jitter=2 if step == "gradient" else 0)
    whole = search(InProcessOracle(images[ids == 7][:5]), EigenDirections(basis), basis.mean.clamp(0, 1), config,
                   snapshots=(300, 700))
    assert whole.queries == 700 and whole.stopped_by == "budget"
    sims = [s for _, s in whole.trajectory]
    assert all(b >= a for a, b in zip(sims, sims[1:]))  # elitist: never decreases
    assert whole.similarity > sims[0] + 0.1  # it climbs from the mean face
    assert best_at(whole.trajectory, 300) <= whole.similarity

    ckpt = tmp_path / "search.ckpt"
    calls = {"n": 0}

    def stop_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    first = search(InProcessOracle(images[ids == 7][:5]), EigenDirections(basis), basis.mean.clamp(0, 1), config,
                   checkpoint=ckpt, stop=stop_after_seven, snapshots=(300, 700))
    assert first.stopped_by == "stopped" and first.queries < 700
    resumed = search(InProcessOracle(images[ids == 7][:5]), EigenDirections(basis), basis.mean.clamp(0, 1), config,
                     checkpoint=ckpt, snapshots=(300, 700))
    assert resumed.queries == 700 and resumed.trajectory == whole.trajectory
    assert torch.equal(resumed.image, whole.image)
    assert torch.equal(resumed.snapshots[300], whole.snapshots[300])


def test_the_gradient_estimate_buys_more_similarity_per_query_than_the_best_candidate(basis, orl):
    """step="gradient" against Algorithm 1's step, same budget, targets and seeds. Measured
    (3 people x 3 seeds, 1000 queries, this basis): gradient - best = +0.10 on average,
    per run -0.01 to +0.19; the mean of 6 runs has a standard error of about 0.025."""
    images, ids = orl
    gaps = []
    for person in (7, 11, 30):
        for seed in (0, 1):
            reached = {}
            for step in ("best", "gradient"):
                config = SearchConfig(budget=1000, batch=32, lr=0.05, lr_late=0.05, starts=1, start_iterations=0,
                                      seed=seed, step=step)
                oracle = InProcessOracle(images[ids == person][:5])
                reached[step] = search(oracle, EigenDirections(basis), basis.mean.clamp(0, 1), config).similarity
            gaps.append(reached["gradient"] - reached["best"])
    assert np.mean(gaps) > 0.03, gaps


def test_registry_settings_are_validated():
    assert set(BLACKBOX) == {"eigenface", "blobs"}
    with pytest.raises(ValueError, match="budgt"):
        build_blackbox("eigenface", budgt=5)
    with pytest.raises(ValueError, match="start"):
        build_blackbox("eigenface", start="middle")
    with pytest.raises(ValueError, match="allowed: blobs, eigenface"):
        build_blackbox("eigenfaces")


def test_cli_attacks_a_real_oracle_within_budget_counting_as_it_counts(basis, orl, tmp_path):
    """`fl-sim attack eigenface --oracle URL`: against the service on loopback, the search
    spends exactly its budget, the server's usage counter agrees, and a second run of the
    same command resumes (nothing more is queried)."""
    import csv
    import json

    from fl_sim.cli import main
    from oracle_process import OracleProcess, client, new_key, png

    images, ids = orl
    crops = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    server = OracleProcess(tmp_path, max_batch=64, rate_per_second=1000.0, threads=2)
    admin = new_key(server, "admin")
    server.start()
    try:
        with client(server, admin) as c:
            r = c.post("/v1/identities", json={"id": "p7", "images": [png(x) for x in crops[ids == 7][:5]]})
            assert r.status_code == 201, r.text
        key = new_key(server, "query")
        basis.save(tmp_path / "basis.pt")
        out = tmp_path / "attack"
        argv = ["attack", "eigenface", "--oracle", server.url, "--key", key, "--target", "p7", "--budget", "300",
                "--out", str(out), "--param", f"basis={tmp_path / 'basis.pt'}", "--param", "batch=32",
                "--param", "starts=2", "--param", "start_iterations=2", "--param", "lr=0.05"]
        assert main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        with client(server, key) as q:
            used = q.get("/v1/usage").json()["queries"]
        assert summary["queries"] == 300 == used  # 1 + 9 x 32 + 11: the last batch cut to fit
        rows = list(csv.DictReader(open(out / "trajectory.csv")))
        best = [float(r["best_similarity"]) for r in rows]
        assert all(b >= a for a, b in zip(best, best[1:])) and int(rows[-1]["queries"]) == 300
        assert (out / "reconstruction.png").stat().st_size > 0 and (out / "trajectory.png").exists()
        assert main(argv) == 0  # the same command again: resumed, finished, nothing more asked
        with client(server, key) as q:
            assert q.get("/v1/usage").json()["queries"] == 300
    finally:
        server.stop()


def test_bench_writes_its_table_and_a_rerun_redoes_nothing(basis, tmp_path):
    import pandas as pd

    from fl_sim.cli import main

    basis.save(tmp_path / "basis.pt")
    out = tmp_path / "bench"
    argv = ["bench", "eigenface", "--split", "dev", "--targets", "1", "--budget", "200", "--workers", "1",
            "--out", str(out), "--param", f"eigenface.basis={tmp_path / 'basis.pt'}",
            "--param", "eigenface.batch=32", "--param", "blobs.batch=32", "--defense", "none,face_gate",
            "--attacks", "eigenface,blobs"]
    assert main(argv) == 0
    frame = pd.read_csv(out / "eigenface.csv")
    assert list(frame.columns)[:7] == ["attack", "target", "budget", "queries", "oracle_similarity",
                                       "critic_similarity", "rank1"]
    assert len(frame) == 4 and set(frame["budget"]) == {200} and set(frame["rank1"]) <= {0, 1}
    plain = frame[frame.defense == "none"].set_index("attack")
    assert (plain["queries"] == 200).all() and plain["oracle_similarity"].notna().all()
    gated = frame[frame.defense == "face_gate"].set_index("attack")
    assert gated.loc["blobs", "stopped_by"] == "no_face" and gated.loc["blobs", "queries"] == 0  # a grey start
    # the mean face is a face: the gate lets the eigenface search start, and candidates it
    # refuses later are left out, so the search spends its whole budget
    assert gated.loc["eigenface", "queries"] == 200 and gated.loc["eigenface", "stopped_by"] == "budget"
    for name in ("table.md", "grid.png", "trajectories.png", "critic.png", "report.html"):
        assert (out / name).stat().st_size > 0
    # the critic's scale beside the table: a real photo of the person scores far above a stranger's
    same, different = map(float, re.search(r"scores (\S+) for its own person, (\S+) for a stranger",
                                           (out / "table.md").read_text()).groups())
    assert 0.6 < same < 0.95 and 0.1 < different < 0.45
    done = {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/result.json")}
    assert len(done) == 4
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/result.json")} == done


def test_grey_eigenface_steps_and_start_are_grey(basis, tmp_path):
    steps = EigenDirections(basis, grey=True).sample(4, torch.Generator().manual_seed(0), best=0.0)
    assert torch.equal(steps[:, 0], steps[:, 1]) and torch.equal(steps[:, 1], steps[:, 2])
    assert steps.abs().max() > 0
    basis.save(tmp_path / "b.pt")
    _, start = build_blackbox("eigenface", grey=True, basis=str(tmp_path / "b.pt")).directions_and_start()
    assert torch.equal(start[0], start[1]) and torch.equal(start[1], start[2])


def test_eigenface_steps_keep_their_scale_and_can_be_symmetric_or_fewer(basis):
    g = torch.Generator().manual_seed(0)
    for kwargs in ({}, {"components": 8}, {"symmetric": True}):
        steps = EigenDirections(basis, **kwargs).sample(256, g, best=0.0)
        rms = float(steps.pow(2).mean().sqrt())
        assert 0.6 < rms <= 1.05, (kwargs, rms)  # a unit step moves pixels by about 1 RMS (symmetry halves some)
    steps = EigenDirections(basis, symmetric=True).sample(4, g, best=0.0)
    assert torch.allclose(steps, mirror(steps))
    few = EigenDirections(basis, components=8).sample(32, g, best=0.0).flatten(1)
    assert torch.linalg.matrix_rank(few) == 8  # 32 steps span the 8 eigenfaces kept, no more
    with pytest.raises(ValueError, match="components"):
        EigenDirections(basis, components=basis.k + 1)


def test_candidates_the_face_gate_refuses_are_left_out_at_no_cost(orl):
    """A gate refuses a whole request for one faceless image; the search isolates those images
    (NaN) by splitting the request, scores the faces, and counts only what was scored."""
    from attacks.score_search import _score_faces
    from fl_sim import oracle_defenses as od

    images, ids = orl
    oracle = InProcessOracle(images[ids == 3][:5], defenses=od.OracleDefenses(face_gate={"min_score": 0.6}))
    noise = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    faces = images[ids == 4][:5]
    batch = torch.cat([faces[:2], noise[:1], faces[2:], noise[1:]])  # faces at 0, 1, 3, 4, 5
    scores = _score_faces(oracle, batch)
    assert np.isnan(scores[[2, 6, 7]]).all() and not np.isnan(scores[[0, 1, 3, 4, 5]]).any()
    assert oracle.queries == 5
    plain = InProcessOracle(images[ids == 3][:5]).score(faces)
    assert np.allclose(scores[[0, 1, 3, 4, 5]], plain, atol=1e-6)


def test_probe_jitter_shifts_both_probes_of_a_pair_alike_and_within_bounds():
    from attacks.score_search import _jitter

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 20, 24, generator=g)
    pairs = 6
    probes = torch.stack([image] * (2 * pairs))
    out = _jitter(probes, 3, g)
    assert out.shape == probes.shape
    assert torch.equal(out[:pairs], out[pairs:])  # a pair's difference sees one alignment
    inner = image[:, 3:-3, 3:-3]
    for shifted in out[:pairs]:  # each is the image moved by at most 3 px (edges repeated)
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(shifted[:, 3 + dy:17 + dy, 3 + dx:21 + dx], inner)]
        assert found
    assert len({tuple(o.flatten()[:8].tolist()) for o in out[:pairs]}) > 1  # offsets differ between pairs


def test_bench_config_names_variants_by_method_and_rejects_unknown_ones(tmp_path):
    import yaml

    from benchmarks.eigenface_table import load_bench_config

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"attacks": {"eigenface": {}, "eigenface-jitter": {"method": "eigenface",
                                                                                        "probe_jitter": 4}}}))
    assert list(load_bench_config(path, {}).attacks) == ["eigenface", "eigenface-jitter"]
    path.write_text(yaml.safe_dump({"attacks": {"eigenface-jitter": {"probe_jitter": 4}}}))
    with pytest.raises(ValueError, match="eigenface-jitter.*allowed.*blobs"):
        load_bench_config(path, {})


def test_bench_splits_are_disjoint_in_the_shipped_config_and_an_overlap_is_refused(tmp_path):
    import yaml

    from benchmarks.eigenface_table import ROOT, SPLITS, load_bench_config

    shipped = load_bench_config(ROOT / "configs" / "bench" / "eigenface.yaml", {})
    people = [p for split in SPLITS for p in shipped.targets(split)]
    assert sorted(people) == list(range(40))  # ORL's 40 people, each in exactly one split
    assert len(shipped.targets("extra")) == 22
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"dev_targets": [1, 2], "eval_targets": [3], "extra_targets": [2, 4]}))
    with pytest.raises(ValueError, match=r"dev_targets and extra_targets share \[2\]"):
        load_bench_config(path, {})


def test_bench_names_a_bad_setting_before_it_starts(tmp_path):
    from benchmarks.eigenface_table import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="'eigenface-aligned': no setting 'probe_jiter'; allowed: .*probe_jitter"):
        main(["--split", "dev", "--targets", "1", "--budget", "100", "--out", str(out),
              "--param", "eigenface-aligned.probe_jiter=3"])
    with pytest.raises(SystemExit, match="'blobs': budget, batch and starts must be >= 1"):
        main(["--split", "dev", "--targets", "1", "--budget", "100", "--out", str(out), "--param", "blobs.batch=0"])
    assert not out.exists()  # nothing started, nothing to clean up


@pytest.mark.parametrize("alignment, stranger", [("yunet", (0.1, 0.25)), ("none", (0.25, 0.4))])
def test_bench_alignment_sets_the_gallery_and_the_attackers_faces(basis, tmp_path, alignment, stranger):
    """`--alignment yunet` (the shipped config's): the gallery is YuNet-aligned (the critic then
    tells strangers apart better: a stranger's photo scores about 0.19; 0.31 on the centred
    squares of `--alignment none`), and the eigenface search aligns its public faces the same way."""
    import json

    from benchmarks.eigenface_table import main

    basis.save(tmp_path / "basis.pt")
    out = tmp_path / "bench"
    assert main(["--split", "dev", "--targets", "1", "--budget", "100", "--workers", "1", "--out", str(out),
                 "--attacks", "eigenface", "--alignment", alignment,
                 "--param", f"eigenface.basis={tmp_path / 'basis.pt'}", "--param", "eigenface.batch=32"]) == 0
    same, different = map(float, re.search(r"scores (\S+) for its own person, (\S+) for a stranger",
                                           (out / "table.md").read_text()).groups())
    assert same > 0.7 and stranger[0] < different < stranger[1]
    (summary,) = [json.loads(p.read_text()) for p in (out / "jobs").glob("*/summary.json")]
    assert summary["settings"]["alignment"] == alignment and summary["queries"] == 100


def test_eigenfaces_train_command_writes_the_basis_its_sha_and_report(tmp_path):
    """`fl-sim eigenfaces train`, small, on aligned public faces: the files a user is told about,
    the recorded sha256 that of basis.pt, and a basis that beats the mean face on held-out faces."""
    import hashlib
    import json

    from fl_sim.cli import main

    out = tmp_path / "eig"
    assert main(["eigenfaces", "train", "--out", str(out), "--faces", "300", "--alignment", "yunet",
                 "--param", "components=32", "--param", "iterations=5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sha256"] == hashlib.sha256((out / "basis.pt").read_bytes()).hexdigest()
    assert 250 <= summary["train_faces"] <= 300  # YuNet misses a few DCGAN faces; they are left out
    assert summary["held_out_mse"] < 0.5 * summary["mean_face_mse"]
    assert EigenfaceBasis.load(out / "basis.pt").k == 32
    for name in ("eigenfaces.png", "report.html"):
        assert (out / name).stat().st_size > 0
    assert not (out / "train.ckpt").exists()
