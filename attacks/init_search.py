"""DFLeak's initialisation search: start the inversion from the public face whose penultimate
features are nearest to the victim's, read off the last FC layer's gradient.

For cross-entropy and one image with features f (the FC layer's input) and softmax p,
dW[c, :] = (p_c - [y = c]) f and db[c] = p_c - [y = c], so f = dW[c, :] / db[c] for every row
c with db[c] != 0 (we take the row with the largest |db[c]|, the best conditioned). For a
batch, row y_n is dominated by image n (its p - 1 term), so dW[y_n] / db[y_n] approximates
image n's features: exact for one image, a heuristic for batches.

The attacker's public set D_c is plain data: by default 100 faces of the DCGAN generator
(the `synthetic` data set, a seed no client data set uses), grey when the clients' images
are grey.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

from attacks.labels import last_layer_gradient, last_layer_names

Distance = Literal["l2", "cosine"]


# --------------------------------------------------------------------------------------------
# The public set
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _public_cached(name: str, size: int, n: int, seed: int) -> torch.Tensor:
    from fl_sim.data import DataSpec, load_dataset

    options: dict[str, float | int | str] = {"identities": n} if name == "synthetic" else {}
    ds = load_dataset(DataSpec(name, size, options=options, seed=seed,
                               max_images=None if name == "synthetic" else n))
    return ds.images[:n].float().contiguous()


def load_public_faces(name: str = "synthetic", size: int = 64, n: int = 100, seed: int = 2024,
                      grey: bool = False) -> torch.Tensor:
    """The attacker's public faces (n, 3, size, size) in [0, 1] from a registered data set;
    grey (ITU-R 601 luma, replicated) when `grey`."""
    from fl_sim.data import to_grey

    images = _public_cached(name, int(size), int(n), int(seed)).clone()
    return to_grey(images) if grey else images


def public_for_case(images: torch.Tensor, shape: tuple[int, int, int], grey: bool) -> torch.Tensor:
    """A public set (M, C, H, W) in [0, 1] brought to a case's image shape (and to grey)."""
    from fl_sim.data import to_grey
    from attacks.restorers import resize_to

    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() != 4:
        raise ValueError(f"public images must be (M, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize_to(x, (shape[1], shape[2])).clamp(0, 1)
    if grey:
        x = to_grey(x)
    if shape[0] == 1:
        x = x.mean(1, keepdim=True)
    return x.contiguous()


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def recover_features(update: dict[str, torch.Tensor], kind: str, model: nn.Module,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """The victim's penultimate features from the classifier's update: (N, D).

    Without labels (or for one image) one row: f = dW[c] / db[c] at c = argmax |db|. With
    labels (a batch), row n is dW[y_n] / db[y_n].
    """
    weight_name, bias_name = last_layer_names(model)
    dW, db = last_layer_gradient(update, kind, weight_name, bias_name)
    if db is None:
        raise ValueError("feature recovery needs the classifier's bias gradient (the model has no FC bias)")
    dW, db = dW.double(), db.double()
    if labels is None or len(labels) == 1:
        c = int(db.abs().argmax())
        rows = torch.tensor([c])
    else:
        rows = torch.as_tensor(labels, dtype=torch.long).cpu()
    denom = db[rows]
    if bool((denom == 0).any()):
        raise ValueError("the bias gradient is zero on a row needed for feature recovery")
    return (dW[rows] / denom[:, None]).float()


class _FeatureTap:
    """Captures the input of the classifier layer during a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        from fl_sim.models import last_linear

        self.features: torch.Tensor | None = None
        self.handle = last_linear(model).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.features = args[0].detach()

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def penultimate_features(model: nn.Module, inputs: torch.Tensor, one_by_one: bool = True) -> torch.Tensor:
    """FC-layer inputs (M, D) for model inputs (M, 3, H, W), already normalised.

    one_by_one: a forward per image, so a model whose BatchNorm runs on batch statistics sees
    each candidate as a client with one image would (FedSGD at batch size 1).
    """
    tap = _FeatureTap(model)
    try:
        feats = []
        chunks = inputs.split(1) if one_by_one else inputs.split(64)
        for chunk in chunks:
            model(chunk)
            assert tap.features is not None
            feats.append(tap.features.flatten(1).float())
        return torch.cat(feats)
    finally:
        tap.close()


def candidate_features(victim, candidates: torch.Tensor) -> torch.Tensor:
    """Features of candidate pixel images (M, C', H, W) through an engine VictimModel, in the
    mode the client ran (one by one when its BatchNorm used batch statistics)."""
    inp = victim.normalise(candidates.to(victim.device))
    return penultimate_features(victim.model, inp, one_by_one=victim.case.bn_mode == "train")


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------
def feature_distances(target: torch.Tensor, candidates: torch.Tensor, metric: Distance = "l2") -> torch.Tensor:
    """(N, M) distances between target features (N, D) and candidate features (M, D)."""
    t, c = target.double(), candidates.double()
    if metric == "l2":
        return torch.cdist(t, c)
    if metric == "cosine":
        return 1 - torch.nn.functional.normalize(t, dim=1) @ torch.nn.functional.normalize(c, dim=1).T
    raise ValueError(f"unknown feature distance {metric!r}; choose l2 or cosine")


@dataclass
class SearchResult:
    order: torch.Tensor  # (N, M) candidate indices, nearest first
    distances: torch.Tensor  # (N, M) distances in that order


def rank_candidates(target: torch.Tensor, candidates: torch.Tensor, metric: Distance = "l2") -> SearchResult:
    d = feature_distances(target, candidates, metric)
    order = torch.argsort(d, dim=1, stable=True)
    return SearchResult(order=order, distances=torch.gather(d, 1, order))


def feature_scale(target: torch.Tensor, candidates: torch.Tensor) -> float:
    """How many times larger the recovered features are than the candidates' (median norms).

    About 1 when the recovery worked; below 1 when a defense zeroed some features (Soteria).
    Far above 1 when the update no longer carries the features: a FedAvg weight difference of a model whose features are tiny (an untrained
    MobileNetV2 with frozen BatchNorm has feature norms ~1e-8) loses dW below float32's
    resolution of W, and dW / db is rounding noise. The L2 search then ranks the candidates
    by their brightness and picks the darkest face (mean grey 0.08 where the faces average 0.33).
    """
    t = torch.linalg.vector_norm(target.double(), dim=1).median()
    c = torch.linalg.vector_norm(candidates.double(), dim=1).median()
    return float(t / c) if c > 0 else math.inf


def pick(result: SearchResult, num_images: int, rank: int = 0) -> list[int]:
    """Candidates for num_images victims: the `rank`-th nearest for each (rank = restart), no
    candidate used twice (greedy, row by row; rows repeat when features came from one row)."""
    m = result.order.shape[1]
    taken: set[int] = set()
    chosen = []
    for n in range(num_images):
        row = result.order[min(n, result.order.shape[0] - 1)].tolist()
        free = [c for c in row if c not in taken] or row
        c = free[min(rank, len(free) - 1)] if m else 0
        taken.add(c)
        chosen.append(c)
    return chosen
