"""Similarity-only face reconstruction: a random search that sees nothing but the scores a
`SimilarityOracle` returns (Razzhigaev et al., Algorithm 1), with two ways to propose steps:

- `eigenface`: d = E z, z ~ N(0, sigma^2 I), E the eigenface basis (attacks/eigenfaces.py),
  divided by the basis' RMS so that `lr` is the RMS pixel change of a step at sigma = 1;
- `blobs`: the paper's baseline, one symmetric grey 2-D Gaussian blob per candidate, random
  centre, sign and amplitude (0.01-0.02), its width shrinking as the similarity rises.

Each iteration scores a batch of candidates X + lr d_j and moves to the best of them only if
it beats the incumbent (elitist: the best similarity never decreases; the authors' code
moved to the best candidate even when it was worse). Two step rules:

- `step="best"` (Algorithm 1): the incumbent moves to the best candidate;
- `step="gradient"`: the candidates come in mirrored pairs X +- lr d_j, and all their scores,
  not only the best one, estimate the similarity's gradient in the basis (an evolution-
  strategies estimate: sum_j (s+_j - s-_j) d_j). The rest of the batch (`line_steps`, one
  more when the pairs leave an odd query over; 4 of 64) scores points along that estimate at
  0.5, 1, 2, 4 times an adaptive step length, which grows when the longest wins and shrinks
  when one shorter than 1 wins or none beats the incumbent and the probes. In 1024 dimensions
  the best of 64 random directions points about 0.09 of the way up the gradient (cosine
  sqrt(2 ln 64 / 1024)); the estimate from 30 pairs about 0.17 (sqrt(30 / 1054)), so each
  query buys more similarity. The best scored point still wins (elitist). With
  `probe_jitter` p, both probes of a pair are shifted by one random offset of up to p px: the
  estimate then follows the similarity averaged over small misalignments, which keeps what any
  recogniser sees (the face) rather than pixel-exact patterns only this oracle rewards. On the
  ORL development people 2 px traded 0.04 oracle similarity for +0.06 critic similarity and
  rank-1 12 -> 50 % (configs/bench/eigenface.yaml).

Multi-start: `starts` runs of `start_iterations` iterations from the start image, the best one
continues. The search stops at the query budget exactly (the last batch is cut to fit), when
the oracle refuses (a blocked key, a spent budget on the oracle's side, a face gate that
refuses the start or passes no candidate for 5 batches in a row: `stopped_by` says which), or
when asked to. Candidates a face gate refuses are isolated by splitting the refused request
(no query is spent on them) and left out; a gradient step shrinks when its line leaves the
faces. With a checkpoint file it saves its whole state (the generator's included) every few
iterations and resumes from it to the same result.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from attacks.eigenfaces import EigenfaceBasis
from attacks.oracle import BudgetExhausted, QueryRefused, SimilarityOracle


class Directions(Protocol):
    def sample(self, n: int, generator: torch.Generator, best: float) -> torch.Tensor:
        """n step directions (n, 3, S, S) in pixel units; `best`: the similarity reached so far."""


class EigenDirections:
    """Steps E z over the basis' first `components` eigenfaces (all: None). grey=True averages
    each step's colour channels (a grey target, such as an ORL photo, gains nothing from colour
    changes, and they cost queries); symmetric=True averages each step with its mirror image
    (faces are nearly symmetric: half the dimensions to search, and steps that stay face-like)."""

    def __init__(self, basis: EigenfaceBasis, sigma: float = 1.0, grey: bool = False,
                 components: int | None = None, symmetric: bool = False) -> None:
        if components is not None and not 1 <= components <= basis.k:
            raise ValueError(f"components must be in [1, {basis.k}] (the basis' size), got {components}")
        self.basis, self.sigma, self.grey, self.symmetric = basis, sigma, grey, symmetric
        kept = EigenfaceBasis(basis.mean, basis.components[:components])
        self._unit = kept.components / kept.scale  # a unit step changes pixels by 1 RMS, however many are kept

    def sample(self, n: int, generator: torch.Generator, best: float) -> torch.Tensor:
        z = torch.randn(n, self._unit.shape[0], generator=generator) * self.sigma
        d = (z @ self._unit).view(n, 3, self.basis.size, self.basis.size)
        if self.symmetric:
            d = 0.5 * (d + d.flip(-1))
        return d.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous() if self.grey else d


class BlobDirections:
    """Symmetric grey Gaussian blobs; width = max_width * (1 - best), within [min, max]."""

    def __init__(self, size: int, amplitude: tuple[float, float] = (0.01, 0.02), max_width: float = 0.25,
                 min_width: float = 0.02) -> None:
        self.size, self.amplitude, self.max_width, self.min_width = size, amplitude, max_width, min_width
        coords = torch.arange(size, dtype=torch.float32)
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def sample(self, n: int, generator: torch.Generator, best: float) -> torch.Tensor:
        width = self.size * min(self.max_width, max(self.min_width, self.max_width * (1.0 - max(0.0, best))))
        u = torch.rand(n, 4, generator=generator)
        cx, cy = u[:, 0] * self.size, u[:, 1] * self.size
        lo, hi = self.amplitude
        amp = (lo + (hi - lo) * u[:, 2]) * torch.where(u[:, 3] < 0.5, -1.0, 1.0)
        mirrored_cx = self.size - 1 - cx
        dx = (self._xx[None] - cx[:, None, None]) ** 2
        dxm = (self._xx[None] - mirrored_cx[:, None, None]) ** 2
        dy = (self._yy[None] - cy[:, None, None]) ** 2
        blob = torch.exp(-(dx + dy) / (2 * width ** 2)) + torch.exp(-(dxm + dy) / (2 * width ** 2))
        blob = blob / blob.amax(dim=(1, 2), keepdim=True)
        return (amp[:, None, None] * blob)[:, None].expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class SearchConfig:
    budget: int = 25_000  # queries (scored images) in all, the start's included
    batch: int = 64  # candidates per iteration
    lr: float = 0.02  # step scale (eigenface: RMS pixel change at sigma = 1; blobs: 1 = the blob as drawn)
    lr_late: float = 0.005  # after lr_switch iterations (the code: 0.005 -> 0.001 after 1000)
    lr_switch: int = 150
    sigma: float = 1.0
    starts: int = 5  # multi-start: runs from the start image ...
    start_iterations: int = 10  # ... of this many iterations each; the best continues
    seed: int = 0
    checkpoint_every: int = 25
    step: Literal["best", "gradient"] = "best"  # Algorithm 1, or steps along the batch's gradient estimate
    line_steps: int = 3  # step="gradient": points scored along the estimate (LINE_MULTIPLIERS x the step length)
    step_length: float = 2.0  # step="gradient": the first step length, in units of lr (then adaptive)
    probe_jitter: int = 0  # step="gradient": each probe pair is shifted by the same random offset of up to this many px

    def __post_init__(self) -> None:
        if self.budget < 1 or self.batch < 1 or self.starts < 1 or self.start_iterations < 0:
            raise ValueError("budget, batch and starts must be >= 1, start_iterations >= 0")
        if self.lr <= 0 or self.lr_late <= 0 or self.sigma <= 0 or self.step_length <= 0:
            raise ValueError("lr, lr_late, sigma and step_length must be > 0")
        if self.step == "gradient" and not 1 <= self.line_steps <= self.batch - 2:
            raise ValueError("step='gradient' needs 1 <= line_steps <= batch - 2 (a mirrored pair at least)")
        if self.probe_jitter < 0:
            raise ValueError(f"probe_jitter must be >= 0 (pixels), got {self.probe_jitter}")


@dataclass
class SearchResult:
    image: torch.Tensor  # (3, S, S) the best image scored
    similarity: float  # its score
    queries: int
    trajectory: list[tuple[int, float]]  # (queries so far, best similarity so far) per iteration
    stopped_by: str  # "budget", "stopped", or the oracle's refusal code (no_face, key_blocked, ...)
    iterations: int
    starts: list[float] = field(default_factory=list)  # each start's best similarity
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # budget -> the best image within it


@dataclass
class _State:
    phase: Literal["starts", "main"]
    start_index: int
    iteration: int  # in the current phase (per start during "starts")
    total_iterations: int
    incumbent: torch.Tensor
    score: float
    best_image: torch.Tensor
    best: float
    queries: int
    trajectory: list[tuple[int, float]]
    start_results: list[tuple[float, torch.Tensor]]
    rng: torch.Tensor
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # budget -> best image within it
    step_length: float = 1.0  # step="gradient": the adaptive step length in units of lr
    refused_batches: int = 0  # batches in a row in which the face gate passed no image


Progress = Callable[[int, int, float], None]  # (queries, budget, best similarity)


def search(oracle: SimilarityOracle, directions: Directions, start: torch.Tensor, config: SearchConfig,
           progress: Progress | None = None, checkpoint: str | Path | None = None,
           stop: Callable[[], bool] | None = None, snapshots: tuple[int, ...] = ()) -> SearchResult:
    """Run (or resume, if `checkpoint` exists) the search from `start` (3, S, S) in [0, 1].
    `snapshots`: budgets at which to keep the best image so far (one run serves several budgets)."""
    ckpt = Path(checkpoint) if checkpoint else None
    gen = torch.Generator().manual_seed(config.seed)
    state = _load(ckpt, config) if ckpt is not None and ckpt.exists() else None
    stopped_by = "budget"
    try:
        if state is None:
            first = float(oracle.score(start[None])[0])
            state = _State("starts", 0, 0, 0, start.clone(), first, start.clone(), first, 1, [(1, first)], [],
                           gen.get_state(), step_length=config.step_length)
        gen.set_state(state.rng)
        while state.queries < config.budget:
            if stop is not None and stop():
                stopped_by = "stopped"
                break
            if state.phase == "starts" and state.iteration >= config.start_iterations:
                state.start_results.append((state.score, state.incumbent))
                state.start_index += 1
                state.iteration = 0
                if state.start_index >= config.starts:  # the best start goes on
                    state.phase = "main"
                    state.score, state.incumbent = max(state.start_results, key=lambda r: r[0])
                else:  # the next start from the start image (its score is known)
                    state.incumbent, state.score = start.clone(), state.trajectory[0][1]
                continue
            before = state.best_image
            _step(oracle, directions, config, state, gen)
            for b in snapshots:  # the best image within budget b: before the batch that crossed b
                if b not in state.snapshots and state.queries >= b:
                    state.snapshots[b] = (state.best_image if state.queries == b else before).clone()
            if progress is not None:
                progress(state.queries, config.budget, state.best)
            if ckpt is not None and state.total_iterations % config.checkpoint_every == 0:
                _save(ckpt, config, state, gen)
    except BudgetExhausted:
        stopped_by = "oracle_budget"
    except QueryRefused as exc:
        stopped_by = exc.code
    if state is None:  # the start itself was refused (a face gate and a blank start): nothing learnt
        return SearchResult(start.clone(), math.nan, 0, [], stopped_by, 0, [], {b: start.clone() for b in snapshots})
    if ckpt is not None:
        _save(ckpt, config, state, gen)
    starts = [s for s, _ in state.start_results]
    for b in snapshots:  # budgets the search did not reach: its final best
        state.snapshots.setdefault(b, state.best_image.clone())
    return SearchResult(state.best_image, state.best, state.queries, state.trajectory, stopped_by,
                        state.total_iterations, starts, dict(state.snapshots))


def _step(oracle: SimilarityOracle, directions: Directions, config: SearchConfig, state: _State,
          gen: torch.Generator) -> None:
    lr = config.lr if state.total_iterations < config.lr_switch else config.lr_late
    n = min(config.batch, config.budget - state.queries)
    if config.step == "gradient" and n >= config.line_steps + 2:
        _gradient_step(oracle, directions, config, state, gen, lr, n)
    else:  # Algorithm 1 (and a last batch too small for pairs)
        _score(oracle, state, (state.incumbent[None] + lr * directions.sample(n, gen, state.best)).clamp(0, 1))
    state.iteration += 1
    state.total_iterations += 1
    state.trajectory.append((state.queries, state.best))


def _score(oracle: SimilarityOracle, state: _State, candidates: torch.Tensor) -> np.ndarray:
    """Score candidates, count them, and move to the best only if it beats the incumbent (elitist).
    Candidates the face gate refuses score NaN; a batch with none scored counts as refused."""
    scores = _score_faces(oracle, candidates)
    scored = ~np.isnan(scores)
    state.queries += int(scored.sum())
    if not scored.any():
        state.refused_batches += 1
        if state.refused_batches >= MAX_REFUSED_BATCHES:
            raise QueryRefused("no_face", f"{MAX_REFUSED_BATCHES} batches in a row had no image the face gate passed")
        return scores
    state.refused_batches = 0
    j = int(np.nanargmax(scores))
    if scores[j] > state.score:
        state.incumbent, state.score = candidates[j].clone(), float(scores[j])
    if scores[j] > state.best:
        state.best_image, state.best = candidates[j].clone(), float(scores[j])
    return scores


MAX_REFUSED_BATCHES = 5  # the search gives up (stopped_by no_face) after this many batches with no face


def _score_faces(oracle: SimilarityOracle, candidates: torch.Tensor) -> np.ndarray:
    """The oracle's scores, NaN for the candidates a face gate refuses. A gate refuses the whole
    request when one image shows no face and scores nothing (no query spent), so a refused
    request is split in halves until the faceless images are isolated: a few more requests,
    never more queries. Other refusals (a blocked key) end the search as before."""
    try:
        return np.asarray(oracle.score(candidates), dtype=np.float64)
    except QueryRefused as exc:
        if exc.code != "no_face":
            raise
        if len(candidates) == 1:
            return np.full(1, np.nan)
    half = len(candidates) // 2
    return np.concatenate([_score_faces(oracle, candidates[:half]), _score_faces(oracle, candidates[half:])])


LINE_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 0.25)  # step lengths tried along the estimate, in this order
GROW, SHRINK = 1.5, 0.6  # the step length's adaptation: the longest wins / one shorter than 1 (or none) wins


def _gradient_step(oracle: SimilarityOracle, directions: Directions, config: SearchConfig, state: _State,
                   gen: torch.Generator, lr: float, n: int) -> None:
    """Mirrored probes, then points along the gradient they estimate: n queries in all."""
    pairs = (n - config.line_steps) // 2
    origin, origin_score = state.incumbent, state.score
    d = directions.sample(pairs, gen, state.best)
    probes = torch.cat([origin[None] + lr * d, origin[None] - lr * d]).clamp(0, 1)
    if config.probe_jitter:
        probes = _jitter(probes, config.probe_jitter, gen)
    probe_scores = _score(oracle, state, probes)
    # a pair with a refused (NaN) side says nothing about the gradient: weight 0
    diff = torch.as_tensor(np.nan_to_num(probe_scores[:pairs] - probe_scores[pairs:]), dtype=torch.float32)
    gradient = torch.einsum("p,pchw->chw", diff, d)
    # unit: the RMS of one direction, so that a step of length 1 moves as far as one probe
    gradient = gradient * (d.pow(2).mean().sqrt() / gradient.pow(2).mean().sqrt().clamp_min(1e-12))
    k = n - 2 * pairs  # the line steps (one more when the pairs leave an odd query over)
    multipliers = [LINE_MULTIPLIERS[i % len(LINE_MULTIPLIERS)] for i in range(k)]
    line = torch.stack([(origin + lr * state.step_length * m * gradient).clamp(0, 1) for m in multipliers])
    line_scores = _score(oracle, state, line)
    if np.isnan(line_scores).all():  # every point along the estimate left the faces: shorter next time
        state.step_length *= SHRINK
        return
    best_line = int(np.nanargmax(line_scores))
    if line_scores[best_line] <= np.nanmax([origin_score, *probe_scores]) or multipliers[best_line] < 1.0:
        state.step_length *= SHRINK
    elif multipliers[best_line] == max(multipliers):
        state.step_length *= GROW


def _jitter(probes: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Shift both probes of each mirrored pair by one random offset (edges repeated). The pair's
    difference then measures the score's slope averaged over small misalignments: it follows
    what survives a shift (the face) rather than pixel-exact patterns only this recogniser sees,
    the input-diversity idea of transferable adversarial examples (Xie et al., 2019)."""
    pairs = len(probes) // 2
    offsets = torch.randint(-pixels, pixels + 1, (pairs, 2), generator=gen).repeat(2, 1)
    h, w = probes.shape[-2:]
    padded = F.pad(probes, (pixels,) * 4, mode="replicate")
    return torch.stack([padded[i, :, pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def _save(path: Path, config: SearchConfig, state: _State, gen: torch.Generator) -> None:
    state.rng = gen.get_state()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(config), "state": asdict(state)}, tmp)
    os.replace(tmp, path)


def _load(path: Path, config: SearchConfig) -> _State:
    data = torch.load(path, map_location="cpu", weights_only=False)
    if data["config"] != asdict(config):
        raise ValueError(f"{path} holds a search with other settings; delete it or use the same settings")
    s = data["state"]
    s["trajectory"] = [tuple(t) for t in s["trajectory"]]
    s["start_results"] = [tuple(r) for r in s["start_results"]]
    return _State(**s)


def queries_to_reach(trajectory: list[tuple[int, float]], similarity: float) -> int | None:
    """The first query count at which the best similarity reached `similarity` (None: never)."""
    return next((q for q, s in trajectory if s >= similarity), None)


def best_at(trajectory: list[tuple[int, float]], budget: int) -> float:
    """The best similarity within `budget` queries."""
    below = [s for q, s in trajectory if q <= budget]
    return below[-1] if below else math.nan


__all__ = ["SearchConfig", "SearchResult", "EigenDirections", "BlobDirections", "search", "queries_to_reach",
           "best_at"]
