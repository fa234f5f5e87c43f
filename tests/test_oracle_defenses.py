"""The oracle's defenses as pure code (fl_sim.oracle_defenses) and through the in-process
oracle that black-box benchmarks use: what each does to the answer, and what it stops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.oracle import BudgetExhausted, InProcessOracle, KeyBlocked
from fl_sim import oracle_defenses as od

SECRET = b"s" * 32


@pytest.fixture(scope="module")
def orl() -> tuple[np.ndarray, np.ndarray]:
    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name="orl", image_size=112))
    images = (ds.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), ds.identities.numpy()


def tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255


def perturbation_stream(base: np.ndarray, n: int, std: float, seed: int = 0) -> np.ndarray:
    """What a score-based search sends: an incumbent plus small random changes."""
    rng = np.random.default_rng(seed)
    x = base[None].astype(np.float32) / 255 + rng.normal(0, std, (n,) + base.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def noise_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# score transforms


def test_rounding_noise_and_decision_change_the_answer_as_documented(orl):
    crops = orl[0][:300]
    raw = np.linspace(-0.2, 0.9, len(crops)).astype(np.float32)

    rounded = od.transform_scores(raw, crops, "a", od.OracleDefenses(rounding={"decimals": 2}), SECRET)
    assert np.allclose(rounded, np.round(raw, 2), atol=1e-6) and not np.allclose(rounded, raw, atol=1e-4)

    hashed = od.OracleDefenses(noise={"std": 0.05, "mode": "hashed"})
    a = od.transform_scores(raw, crops, "a", hashed, SECRET)
    b = od.transform_scores(raw, crops, "a", hashed, SECRET)
    assert np.array_equal(a, b)  # the same image is told the same noisy score: repeats average nothing
    assert not np.array_equal(a, od.transform_scores(raw, crops, "b", hashed, SECRET))  # keyed by identity
    assert not np.array_equal(a, od.transform_scores(raw, crops, "a", hashed, b"t" * 32))  # and by the secret
    # the noise has the configured std: 300 draws, sample std within its 99.9 % chi-square band (about +-17 %)
    assert 0.83 * 0.05 < np.std(a - raw) < 1.17 * 0.05

    fresh = od.OracleDefenses(noise={"std": 0.05, "mode": "fresh"})
    rng = np.random.default_rng(0)
    repeats = np.stack([od.transform_scores(raw, crops, "a", fresh, SECRET, rng) for _ in range(64)])
    assert not np.array_equal(repeats[0], repeats[1])
    # fresh noise averages away (64 repeats: std / 8), hashed noise does not
    assert np.std(repeats.mean(0) - raw) < 0.4 * np.std(a - raw)

    decided = od.transform_scores(raw, crops, "a", od.OracleDefenses(decision={"threshold": 0.363}), SECRET)
    assert set(np.unique(decided)) == {0.0, 1.0}
    assert np.array_equal(decided, (raw >= 0.363).astype(np.float32))
    assert od.output_kind(od.OracleDefenses(decision={"threshold": 0.3})) == "decision"


# ---------------------------------------------------------------------------------------
# the stateful detector


def test_detector_passes_benign_photos_and_flags_a_perturbation_search(orl):
    images, _ = orl
    settings = od.DetectorSettings(k=20, threshold=1.5)
    benign = od.StatefulDetector(settings)
    order = np.random.default_rng(1).permutation(len(images))
    verdicts = [benign.observe("user", images[order[i:i + 16]]) for i in range(0, len(images), 16)]
    assert not any(v.flagged for v in verdicts)  # 400 photos of 40 people: never flagged
    assert min(v.distance for v in verdicts if not np.isnan(v.distance)) > 1.5 * settings.threshold

    attack = od.StatefulDetector(settings)
    stream = perturbation_stream(images[0], 64, std=0.1)
    first = attack.observe("attacker", stream[:16])
    assert not first.flagged and np.isnan(first.distance)  # under k earlier queries: no verdict yet
    second = attack.observe("attacker", stream[16:32])
    assert second.flagged and second.distance < settings.threshold
    # keys are judged apart: the benign user's history does not make the attacker's
    assert not od.StatefulDetector(settings).observe("other", stream[:16]).flagged

    # the threshold from a benign stream at a false-positive rate sits between the two
    t = od.calibrate_threshold(images[order], k=20, false_positive_rate=0.001)
    assert second.distance < t < 3.0


def test_knn_distances_use_only_earlier_queries():
    q = np.array([[0.0], [1.0], [3.0]], np.float32)
    d = od.knn_distances(np.array([[10.0]], np.float32), q, k=1)
    assert np.allclose(d, [10.0, 1.0, 2.0])  # never a query's distance to itself or to later ones
    assert np.isnan(od.knn_distances(np.zeros((0, 1), np.float32), q, k=3)).all()


# ---------------------------------------------------------------------------------------
# the in-process oracle behind the same defenses


def test_in_process_oracle_blocks_a_search_and_records_when(orl):
    images, ids = orl
    defenses = od.OracleDefenses(detector={"k": 10, "threshold": 1.5, "action": "block"})
    oracle = InProcessOracle(tensor(images[ids == 0][:4]), defenses=defenses)
    benign = oracle.score(tensor(images[ids != 0][::7][:30]))
    assert len(benign) == 30 and oracle.flagged_at is None
    stream = perturbation_stream(images[ids == 0][5], 40, std=0.05)
    oracle.score(tensor(stream[:5]))  # 5 close queries among 30 distinct ones: their 10 nearest are mostly far
    with pytest.raises(KeyBlocked):
        oracle.score(tensor(stream[5:21]))
    assert oracle.flagged_at == 30 + 5 + 16 and oracle.queries == 35  # the refused batch cost nothing
    with pytest.raises(KeyBlocked):  # and the caller stays blocked, whatever it sends
        oracle.score(tensor(images[ids == 3][:2]))

    flagger = InProcessOracle(tensor(images[ids == 0][:4]), defenses=od.OracleDefenses(
        detector={"k": 10, "threshold": 1.5, "action": "flag"}))
    flagger.score(tensor(stream[:8]))
    flagger.score(tensor(stream[8:24]))  # flagged, still answered
    assert flagger.flagged_at == 24 and flagger.queries == 24


def test_in_process_oracle_identity_budget_and_noise(orl):
    images, ids = orl
    target = tensor(images[ids == 0][:4])
    plain = InProcessOracle(target)
    noisy = InProcessOracle(target, defenses=od.OracleDefenses(noise={"std": 0.05}, rounding={"decimals": 3},
                                                               identity_budget=10))
    probe = tensor(images[ids == 0][4:8])
    clean, told = plain.score(probe), noisy.score(probe)
    assert np.allclose(told, np.round(told, 3), atol=1e-6)
    assert 0 < np.abs(told - clean).max() < 0.3
    assert np.array_equal(noisy.score(probe), told)  # hashed: the same images, the same answer
    with pytest.raises(BudgetExhausted):
        noisy.score(probe)  # 8 used of 10; 4 more do not fit
    assert noisy.queries == 8 and noisy.budget_left == 2


def test_face_gate_refuses_faceless_queries_at_no_cost(orl):
    from attacks.oracle import QueryRefused
    from attacks.score_search import BlobDirections

    images, ids = orl
    oracle = InProcessOracle(tensor(images[ids == 0][:4]), defenses=od.OracleDefenses(face_gate={"min_score": 0.6}))
    assert len(oracle.score(tensor(images[ids == 1][:4]))) == 4  # faces pass
    # a search's faces pass too (the incumbent plus small noise)
    assert len(oracle.score(tensor(perturbation_stream(images[ids == 2][0], 8, std=0.05)))) == 8
    with pytest.raises(QueryRefused) as refused:
        oracle.score(tensor(noise_images(2)))
    assert refused.value.code == "no_face"
    grey = torch.full((1, 3, 112, 112), 0.5)
    blob = (grey + 20 * BlobDirections(112).sample(1, torch.Generator().manual_seed(0), 0.0)).clamp(0, 1)
    with pytest.raises(QueryRefused):
        oracle.score(blob)  # the blobs baseline's start, a grey field with a blob, is no face
    assert oracle.queries == 12  # refused batches cost nothing
