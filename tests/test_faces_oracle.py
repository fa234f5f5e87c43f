"""The face embedders (one place for the critic and the oracle) and the in-process oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.oracle import BudgetExhausted, InProcessOracle, SimilarityOracle
from fl_sim.data import DataSpec, load_dataset
from fl_sim.faces import SFaceEmbedder, embedder


@pytest.fixture(scope="module")
def orl112():
    return load_dataset(DataSpec(name="orl", image_size=112))


def test_dequantised_sface_gives_the_shipped_models_embeddings():
    """The speed-up (weights dequantised once, a batch dimension) changes no embedding."""
    x = torch.rand(6, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    fast, shipped = SFaceEmbedder(), SFaceEmbedder(quantised=True)
    a, b = fast.embed(x), shipped.embed(x)
    assert a.shape == (6, 128)
    # measured: 3.4e-7 (float reassociation of the folded weights)
    assert np.abs(a - b).max() < 1e-5
    one_by_one = np.concatenate([fast.embed(x[i:i + 1]) for i in range(len(x))])
    assert np.abs(a - one_by_one).max() < 1e-5


def test_in_process_oracle_scores_the_target_above_others_and_keeps_its_budget(orl112):
    ids = orl112.identities
    person, other = 3, 17
    own = orl112.images[ids == person]
    enrolled, held_out = own[:5], own[5:]
    oracle = InProcessOracle(enrolled, backend="sface", budget=12)
    assert isinstance(oracle, SimilarityOracle)
    mine = oracle.score(held_out)
    theirs = oracle.score(orl112.images[ids == other][:5])
    assert oracle.queries == 10 and oracle.budget_left == 2
    # SFace on ORL: same person about 0.64, different about 0.09 (measured on all 40 people)
    assert mine.min() > theirs.max()
    with pytest.raises(BudgetExhausted):
        oracle.score(held_out[:3])  # 3 > 2 left: refused whole, nothing counted
    assert oracle.queries == 10
    assert len(oracle.score(held_out[:2])) == 2 and oracle.budget_left == 0


def test_metrics_and_oracle_share_one_embedder():
    from fl_sim import metrics

    assert metrics.embedder("sface") is embedder("sface")


def test_a_shared_embedder_is_safe_in_threads():
    """One embedder per process serves every thread (benchmark shards, the Ray server thread):
    concurrent calls give what sequential ones give. (FaceNet's cv2 net failed with
    "buf.shape() == m.shape()" when two threads ran it at once.)"""
    import threading

    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for name in ("facenet", "sface", "sface-bf16"):  # sface-bf16: the oracle's micro-batcher shares it
        model = embedder(name)
        expected = model.embed(x)
        results: list[np.ndarray] = []
        errors: list[BaseException] = []

        def work():
            try:
                for _ in range(5):
                    results.append(model.embed(x))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 15 and all(np.abs(r - expected).max() < 1e-5 for r in results)
