"""Rank-1 re-identification of reconstructions by the critic (FaceNet) among all of a data
set's identities, each known from its other images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_sim.data import DataSpec, load_dataset
from fl_sim.metrics import IdentityGallery, image_metrics


@pytest.fixture(scope="module")
def orl_gallery():
    orl = load_dataset(DataSpec("orl", 64))
    return orl, IdentityGallery.of(orl.images, orl.identities, "facenet")


def test_real_faces_are_reidentified_and_noise_is_not(orl_gallery):
    orl, gallery = orl_gallery
    index = np.arange(0, 400, 10)[:20] + 3  # one photo of each of 20 people (shot 4)
    ranks = gallery.ranks(orl.images[index], index)
    # FaceNet names the right person first among 40 for 98 % of ORL photos; the photo itself
    # is left out of its person's template, so this is recognition, not lookup.
    assert (ranks == 1).mean() >= 0.85, ranks
    # The same photos claimed as the next person's: that person comes first almost never.
    shifted = (index + 10) % 400
    wrong = gallery.ranks(orl.images[index], shifted)
    assert (wrong == 1).mean() <= 0.1, wrong
    # Noise (what a failed attack returns) lands near the middle of 40, not first (measured
    # over 10 x 40 photos: 100 % right, 0 % for the wrong person, 2.5 % for noise, median 20).
    noise = torch.rand(20, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert (gallery.ranks(noise, index) == 1).mean() <= 0.15


def test_image_metrics_reports_rank1_after_matching_the_batch(orl_gallery):
    orl, gallery = orl_gallery
    index = np.array([5, 15])  # two people; the reconstruction lists them in the other order
    recon = orl.images[index[::-1].copy()]
    out = image_metrics(recon, orl.images[index], ["psnr"], "facenet", gallery, index)
    assert out["id_rank1"].tolist() == [1.0, 1.0] and out["id_rank"].tolist() == [1.0, 1.0]
    # claimed as another person's photo: not named first, and the rank says how far down the
    # right person is (what rank-1 alone cannot tell apart)
    mine, other = np.array([5]), np.array([25])
    wrong = image_metrics(orl.images[mine], orl.images[other], ["psnr"], "facenet", gallery, other)
    assert wrong["id_rank1"].tolist() == [0.0]
    assert wrong["id_rank"][0] > 1 and wrong["id_rank"].tolist() == gallery.ranks(orl.images[mine], other).tolist()
    assert np.isinf(out["psnr"]).all() or (out["psnr"] > 90).all()


def test_a_gallery_is_embedded_once_per_data_set(orl_gallery, monkeypatch):
    """A sweep builds the gallery at every point: the same data set reuses its embeddings
    (no call to the critic), other images (even one pixel) get their own."""
    import fl_sim.metrics as metrics

    orl, gallery = orl_gallery
    calls = []
    real = metrics.embedder
    monkeypatch.setattr(metrics, "embedder", lambda backend: calls.append(backend) or real(backend))
    again = IdentityGallery.of(orl.images, orl.identities, "facenet")
    assert calls == [] and np.array_equal(again.embeddings, gallery.embeddings)
    changed = orl.images[:64].clone()
    changed[0, :, 0, 0] = 1 - changed[0, :, 0, 0]
    changed[1] = torch.flip(changed[1], dims=[-1])
    other = IdentityGallery.of(changed, orl.identities[:64], "facenet")
    assert calls == ["facenet"]
    assert np.allclose(other.embeddings[2:], gallery.embeddings[2:64], atol=1e-4)
    assert not np.allclose(other.embeddings[1], gallery.embeddings[1], atol=1e-3)


def test_critic_calibration_puts_a_scale_under_rank1(tmp_path):
    """`fl-sim bench critic`: the undegraded photos are re-identified, a stronger blur leaves
    less of the person (measured on ORL's first photos: 1 px 100 %, 3 px 15 % rank-1; PSNR
    29.3 and 22.6 dB); a bad --shots is an error."""
    import pandas as pd

    from benchmarks.critic_calibration import blur, calibrate, main
    from fl_sim.config import load_config

    rows = calibrate(load_config("configs/bench/dfleak.yaml"), [0], degradations={"blur": (blur, [1.0, 3.0])})
    none, mild, strong = rows
    assert none.degradation == "none" and none.probes == 40 and none.id_rank1 >= 0.85
    assert mild.psnr > strong.psnr + 4 and mild.id_rank1 >= 0.8 and strong.id_rank1 <= 0.4
    assert strong.id_rank_median > mild.id_rank_median and strong.id_similarity < mild.id_similarity
    assert main(["--shots", "0,x"]) == 2
