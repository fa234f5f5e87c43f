"""Reconstruction metrics: mse, psnr, ssim, lpips, identity similarity, label accuracy.

Images are float tensors in [0, 1], (N, C, H, W). Every function returns one value per
image pair, so a batch's metrics are a vector and the caller decides how to aggregate.
"""
from __future__ import annotations

import pickle
import warnings
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fl_sim import assets
from fl_sim.faces import EMBEDDERS, FaceEmbedder, embedder, template_of  # noqa: F401  (re-exported)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return (a, b) if a.dim() == 4 else (a.unsqueeze(0), b.unsqueeze(0))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _pair(a, b)
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    return 10 * torch.log10(1.0 / mse(a, b).clamp_min(1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Standard Gaussian-window SSIM (11 x 11, sigma 1.5; Wang et al. 2004), one value per image.

    The SSIM map comes from torchmetrics; it is averaged only where the 11 x 11 window fits
    inside the image, as the reference implementation and scikit-image do. (torchmetrics'
    own mean also counts the border positions it computes on reflect padding: up to 0.02
    off at 48 px.) Colour images: the mean over channels.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(a, b)
    _, full = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", return_full_image=True)
    r = 5  # the window's half-width: positions closer to the border use padding
    return full[..., r:-r, r:-r].mean(dim=(1, 2, 3))


@lru_cache(maxsize=1)
def _lpips_model() -> torch.nn.Module:
    """LPIPS v0.1 on AlexNet with the real backbone from the `lpips-alexnet` asset.

    lpips fetches its backbone from a torchvision download, which fails offline, and with
    pnet_rand=True it silently keeps a random one. So build it with pnet_rand=True, then
    load the pretrained AlexNet convolutions (flax HWIO kernels) ourselves.
    """
    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" from inside lpips
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    with open(assets.get("lpips-alexnet"), "rb") as fh:
        ckpt = pickle.load(fh)["AlexNet_0"]
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != 5:
        raise RuntimeError(f"expected AlexNet's 5 convolutions, found {len(convs)}")
    with torch.no_grad():
        for i, conv in enumerate(convs):
            kernel = torch.from_numpy(np.asarray(ckpt[f"Conv_{i}"]["kernel"])).permute(3, 2, 0, 1)
            conv.weight.copy_(kernel)
            conv.bias.copy_(torch.from_numpy(np.asarray(ckpt[f"Conv_{i}"]["bias"])))
    return model.eval().requires_grad_(False)


def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (AlexNet) distance; lower is more similar."""
    a, b = _pair(a, b)
    with torch.no_grad():
        return _lpips_model()(a * 2 - 1, b * 2 - 1).flatten()


# ---------------------------------------------------------------------------------------
# Identity similarity: the face-recognition backends live in fl_sim.faces (shared with the
# similarity oracle)


def id_similarity(a: torch.Tensor, b: torch.Tensor, backend: str = "facenet") -> torch.Tensor:
    """Cosine similarity of the two images' face embeddings, per pair."""
    a, b = _pair(a, b)
    model = embedder(backend)
    return torch.from_numpy((model.embed(a) * model.embed(b)).sum(1))


_GALLERY_EMBEDDINGS: dict[tuple, np.ndarray] = {}


class IdentityGallery:
    """Every identity of a data set as the critic sees it, for rank-1 re-identification:
    is the person the critic finds most like a reconstruction the victim?

    Each identity's template is the normalised mean embedding of its images, leaving out the
    images the victim trained on (a reconstruction must be recognised from other photos of
    the person, not matched to its own source image). An identity whose only images are the
    victim's cannot be re-identified and counts as a miss.
    """

    def __init__(self, embeddings: np.ndarray, identities: np.ndarray, backend: str) -> None:
        self.embeddings = embeddings.astype(np.float32)  # (N, D), unit rows, in data set order
        self.identities = np.asarray(identities, dtype=np.int64)
        self.backend = backend
        self.people = np.unique(self.identities[self.identities >= 0])

    @classmethod
    def of(cls, images: torch.Tensor, identities: torch.Tensor, backend: str = "facenet",
           chunk: int = 64) -> "IdentityGallery":
        """The gallery of a data set. Embedding it costs seconds per thousand images, and a
        sweep or a bench builds it for the same data set at every point: the embeddings are
        kept per (backend, data set content) for the life of the process."""
        import hashlib

        digest = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes())
        digest.update(identities.cpu().numpy().astype(np.int64).tobytes())
        key = (backend, tuple(images.shape), digest.hexdigest())
        if key not in _GALLERY_EMBEDDINGS:
            model = embedder(backend)
            _GALLERY_EMBEDDINGS.clear()  # one data set at a time: a gallery can be large
            _GALLERY_EMBEDDINGS[key] = np.concatenate([model.embed(images[i:i + chunk])
                                                       for i in range(0, len(images), chunk)])
        return cls(_GALLERY_EMBEDDINGS[key], identities.cpu().numpy(), backend)

    def ranks(self, recon: torch.Tensor, truth_index: np.ndarray) -> np.ndarray:
        """The rank (1 = best) of each reconstruction's true identity among all identities;
        recon[i] shows data set image truth_index[i]."""
        truth_index = np.asarray(truth_index, dtype=np.int64)
        keep = np.ones(len(self.identities), dtype=bool)
        keep[truth_index] = False
        templates = np.stack([template_of(self.embeddings[keep & (self.identities == p)])
                              if (keep & (self.identities == p)).any() else np.full(self.embeddings.shape[1], np.nan)
                              for p in self.people])
        scores = embedder(self.backend).embed(recon.detach().float().cpu()) @ np.nan_to_num(templates, nan=0.0).T
        scores[:, np.isnan(templates[:, 0])] = -np.inf
        true_col = np.searchsorted(self.people, self.identities[truth_index])
        own = scores[np.arange(len(truth_index)), true_col]
        return 1 + (scores > own[:, None]).sum(axis=1) + np.isinf(own) * len(self.people)


def label_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of labels recovered, as multisets (a batch's order is unknown to the attacker)."""
    p = np.bincount(predicted.cpu().numpy(), minlength=1)
    t = np.bincount(truth.cpu().numpy(), minlength=1)
    n = max(len(p), len(t))
    p, t = np.pad(p, (0, n - len(p))), np.pad(t, (0, n - len(t)))
    return float(np.minimum(p, t).sum() / max(len(truth), 1))


def match_to_truth(recon: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Hungarian matching by MSE: order[i] is the reconstruction matched to truth image i."""
    r = recon.detach().float().cpu().flatten(1)
    t = truth.detach().float().cpu().flatten(1)
    cost = torch.cdist(t, r).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "psnr": psnr, "mse": mse, "ssim": ssim, "lpips": lpips,
}


def image_metrics(recon: torch.Tensor, truth: torch.Tensor, names: list[str] | None = None,
                  id_backend: str | None = None, gallery: IdentityGallery | None = None,
                  truth_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every named metric per image, after matching the batch to the ground truth; with a
    gallery and the truth's data set indices, also the victim's rank among the identities
    (`id_rank`, 1 = named first) and rank-1 re-identification (`id_rank1`, 1 or 0)."""
    order = match_to_truth(recon, truth)
    recon = recon.detach().cpu()[torch.as_tensor(order)]
    out = {n: METRICS[n](recon, truth).numpy() for n in (names or list(METRICS))}
    if id_backend:
        out["id_similarity"] = id_similarity(recon, truth, id_backend).numpy()
    if gallery is not None and truth_index is not None:
        ranks = gallery.ranks(recon, truth_index).astype(np.float64)
        out["id_rank1"] = (ranks == 1).astype(np.float64)
        # the rank itself: with a few victims rank-1 is all or nothing, while "the victim is
        # the critic's 3rd guess of 40" already narrows who the client is
        out["id_rank"] = ranks
    return out
