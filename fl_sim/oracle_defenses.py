"""Defenses of a similarity oracle, as pure code that the service (server/oracle) and the
in-process oracle (attacks/oracle.py) share, so a black-box attack benchmarked in process
meets exactly what it would meet over HTTP.

Settings (the `defenses:` section of the oracle's settings; every one off by default):

    defenses:
      face_gate: {min_score: 0.6}        # refuse images in which YuNet finds no face
      detector: {k: 20, threshold: 1.5, window: 5000, action: block}   # stateful detection
      noise: {std: 0.02, mode: hashed}    # fresh: new noise per query; hashed: fixed per image
      rounding: {decimals: 2}             # scores rounded to k decimals
      decision: {threshold: 0.363}        # answer 1.0 (match) or 0.0 only
      identity_budget: 50000              # images scored against one identity, all keys together

Order: the gate and the detector look at the query before it is scored (a refused or
blocked query costs the caller nothing); the score transforms apply in the order noise,
rounding, decision (noise rounded away would be no noise; a decision hides everything).

The stateful detector follows Chen, Carlini and Wagner ("Stateful detection of black-box
adversarial attacks", 2020): each key's recent queries are kept as small feature vectors
(the 112 x 112 crop averaged to 16 x 16 x 3, in [0, 1]); a query whose mean L2 distance to
its k nearest earlier queries of the same key is below the threshold is flagged. A search
that perturbs an incumbent (the eigenface attack, the blobs baseline) queries images a
fraction of a unit apart; distinct photos sit several units apart. Measured on ORL (400
photos of 40 people, one key, random order, k = 20): benign mean k-NN distance 2.55 at the
least, 2.63 at the 0.1th percentile; an incumbent plus Gaussian pixel noise of std 0.1:
0.54. `calibrate_threshold` sets the threshold from a benign stream at a chosen false-
positive rate, as the paper does. The history is held in memory: a restart forgets it.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaceGateSettings(_Section):
    min_score: float = Field(0.6, gt=0.0, lt=1.0, description="YuNet face score below which an image is refused")


class DetectorSettings(_Section):
    k: int = Field(20, ge=1, description="nearest earlier queries averaged")
    threshold: float = Field(1.5, gt=0.0, description="mean k-NN feature distance below which a query is flagged")
    window: int = Field(5000, ge=2, description="earlier queries kept per key")
    action: Literal["flag", "block"] = Field("block", description="flag: count and log; block: refuse the key "
                                                                 "from the first flagged query on")


class NoiseSettings(_Section):
    std: float = Field(gt=0.0, description="standard deviation of the Gaussian noise added to each score")
    mode: Literal["fresh", "hashed"] = Field("hashed", description="fresh: a new draw per query (repeats average "
                                                                  "it away); hashed: fixed per image and identity")


class RoundingSettings(_Section):
    decimals: int = Field(ge=0, le=8)


class DecisionSettings(_Section):
    threshold: float = Field(gt=-1.0, lt=1.0, description="score at or above which the answer is 1.0 (a match)")


class OracleDefenses(_Section):
    face_gate: FaceGateSettings | None = None
    detector: DetectorSettings | None = None
    noise: NoiseSettings | None = None
    rounding: RoundingSettings | None = None
    decision: DecisionSettings | None = None
    identity_budget: int | None = Field(None, ge=0, description="images scored against one identity, all keys")

    def active(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


@dataclass
class QueryRefused(Exception):
    """A query the defenses refuse; the service answers it with `status` and this body."""

    status: int
    code: str
    reason: str


# ---------------------------------------------------------------------------------------
# Before scoring: the face gate


def gate_faces(images: list[np.ndarray] | np.ndarray, settings: FaceGateSettings) -> None:
    """Refuse (422 no_face) when any image holds no face YuNet scores >= min_score."""
    from fl_sim.face_detection import has_face

    for i, image in enumerate(images):
        if not has_face(np.asarray(image), settings.min_score):
            raise QueryRefused(422, "no_face", f"images[{i}]: no face found (YuNet score >= {settings.min_score:g}); "
                                               "this oracle scores faces only")


# ---------------------------------------------------------------------------------------
# Before scoring: the stateful detector

FEATURE_SIDE = 16


def query_features(crops: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 16 * 16 * 3) float32 in [0, 1]: block means (area resize)."""
    n, s = len(crops), crops.shape[1]
    x = crops.astype(np.float32) / 255.0
    if s % FEATURE_SIDE == 0:
        b = s // FEATURE_SIDE
        x = x.reshape(n, FEATURE_SIDE, b, FEATURE_SIDE, b, 3).mean(axis=(2, 4))
    else:
        import cv2

        x = np.stack([cv2.resize(img, (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_AREA) for img in x])
    return x.reshape(n, -1)


def knn_distances(history: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean L2 distance of each query to its k nearest among `history` and the queries before
    it in the batch; NaN while fewer than k earlier queries exist."""
    pool = np.concatenate([history, queries]) if len(history) else queries
    # squared distances by the expansion |a|^2 + |b|^2 - 2ab (one matmul), clipped at 0
    d2 = (queries ** 2).sum(1)[:, None] + (pool ** 2).sum(1)[None, :] - 2.0 * queries @ pool.T
    d = np.sqrt(np.maximum(d2, 0.0))
    m = len(history)
    out = np.full(len(queries), np.nan, dtype=np.float32)
    for i in range(len(queries)):
        earlier = d[i, : m + i]  # the history and the batch's earlier queries, never itself
        if len(earlier) >= k:
            out[i] = np.partition(earlier, k - 1)[:k].mean()
    return out


def calibrate_threshold(benign_crops: np.ndarray, k: int, false_positive_rate: float = 0.001) -> float:
    """The detector threshold that flags `false_positive_rate` of a benign query stream."""
    d = knn_distances(np.zeros((0, FEATURE_SIDE * FEATURE_SIDE * 3), np.float32), query_features(benign_crops), k)
    d = d[~np.isnan(d)]
    if not len(d):
        raise ValueError(f"a benign stream of more than k={k} queries is needed")
    return float(np.quantile(d, false_positive_rate))


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    distance: float  # the smallest mean k-NN distance in the batch (NaN: too little history)


class StatefulDetector:
    """Per-key query history and the k-NN test; thread-safe."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._history: dict[str, collections.deque[np.ndarray]] = {}

    def observe(self, key: str, crops: np.ndarray) -> Verdict:
        """Test the batch against the key's history, then add it to the history."""
        features = query_features(crops)
        with self._lock:
            buffer = self._history.setdefault(key, collections.deque(maxlen=self.settings.window))
            history = np.stack(buffer) if buffer else np.zeros((0, features.shape[1]), np.float32)
            distances = knn_distances(history, features, self.settings.k)
            buffer.extend(features)
        known = distances[~np.isnan(distances)]
        closest = float(known.min()) if len(known) else float("nan")
        return Verdict(flagged=bool(len(known) and closest < self.settings.threshold), distance=closest)

    def forget(self, key: str) -> None:
        with self._lock:
            self._history.pop(key, None)


# ---------------------------------------------------------------------------------------
# After scoring: what the caller is told


def hashed_normal(crops: np.ndarray, identity: str, secret: bytes) -> np.ndarray:
    """One standard normal draw per image, fixed by the image's bytes, the identity and the
    service's secret: asking again returns the same noise, so averaging repeats gains nothing."""
    out = np.empty(len(crops), dtype=np.float64)
    for i, crop in enumerate(crops):
        digest = hmac.new(secret, identity.encode() + b"\0" + np.ascontiguousarray(crop).tobytes(),
                          hashlib.sha256).digest()
        out[i] = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal()
    return out


def transform_scores(scores: np.ndarray, crops: np.ndarray, identity: str, defenses: OracleDefenses,
                     secret: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
    """Noise, then rounding, then the decision; the scores a caller is given (float64, so a
    score rounded to k decimals reads as k decimals in JSON)."""
    out = np.asarray(scores, dtype=np.float64)
    if defenses.noise is not None:
        if defenses.noise.mode == "hashed":
            draws = hashed_normal(crops, identity, secret)
        else:
            draws = (rng or np.random.default_rng()).standard_normal(len(out))
        out = out + defenses.noise.std * draws
    if defenses.rounding is not None:
        out = np.round(out, defenses.rounding.decimals)
    if defenses.decision is not None:
        out = (out >= defenses.decision.threshold).astype(np.float64)
    return out


def output_kind(defenses: OracleDefenses) -> Literal["similarity", "decision"]:
    return "decision" if defenses.decision is not None else "similarity"


__all__ = ["OracleDefenses", "FaceGateSettings", "DetectorSettings", "NoiseSettings", "RoundingSettings",
           "DecisionSettings", "QueryRefused", "StatefulDetector", "Verdict", "gate_faces", "query_features",
           "knn_distances", "calibrate_threshold", "hashed_normal", "transform_scores", "output_kind"]
