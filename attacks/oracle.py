"""The similarity oracle as a black-box attacker sees it: submit images for a target identity,
read back one similarity score per image, within a query budget.

`SimilarityOracle` is the contract; black-box attacks (eigenfaces and the baselines) talk to
it and never know which implementation answers:

- `InProcessOracle`: the scoring code of the service (`fl_sim.faces`: the same embedder,
  template and similarity), in this process, for benchmarks that need tens of thousands of
  queries without HTTP in the way;
- `HttpOracle`: a client of the similarity-oracle service (`fl-sim oracle serve`, API v1):
  one reused connection, batches split to the service's limit, retries with backoff on 429
  and 5xx (honouring Retry-After), and an exact count of the images scored, which equals
  the service's usage counter for the key.

Both count queries the same way: one query per image scored. A batch that does not fit in
the budget left is refused whole (`BudgetExhausted`), never half-scored. Both meet the same
defenses (`fl_sim.oracle_defenses`: noise, rounding, decision-only output, the face gate,
the stateful detector, identity budgets): a refused batch raises `QueryRefused` with the
service's error code (`KeyBlocked` once the detector has blocked the caller) and costs
no queries.
"""
from __future__ import annotations

import base64
import time
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fl_sim import oracle_defenses as od
from fl_sim.faces import embedder, similarity, template_of, to_uint8_rgb


class OracleError(RuntimeError):
    """The oracle refused or failed; the message says why."""


class BudgetExhausted(OracleError):
    """The query budget is spent (or the batch does not fit in what is left)."""


class QueryRefused(OracleError):
    """The oracle's defenses refused the batch (`code`: no_face, key_blocked, ...); nothing was scored."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


class KeyBlocked(QueryRefused):
    """The stateful detector has blocked this caller: no further query will be answered."""


def _refused(code: str, reason: str) -> QueryRefused:
    return (KeyBlocked if code == "key_blocked" else QueryRefused)(code, reason)


@runtime_checkable
class SimilarityOracle(Protocol):
    def score(self, images: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) RGB in [0, 1] -> (N,) similarity of each image to the target identity."""

    @property
    def queries(self) -> int:
        """Images scored so far through this oracle."""

    @property
    def budget_left(self) -> int | None:
        """Images that may still be scored (None: no budget)."""


class InProcessOracle:
    """The service's scoring path in this process, against one enrolled identity, behind the
    same defenses as the service (`defenses`; none by default)."""

    def __init__(self, enrolled: torch.Tensor, backend: str = "sface-bf16", budget: int | None = None,
                 defenses: od.OracleDefenses | None = None, seed: int = 0) -> None:
        """`enrolled`: the target's enrolment images (N, 3, H, W) RGB in [0, 1]. `seed` fixes
        the secret behind hashed noise and the fresh-noise generator."""
        self._embedder = embedder(backend)
        self._template = template_of(self._embed(self._crops(enrolled)))
        self.defenses = defenses or od.OracleDefenses()
        budgets = [b for b in (budget, self.defenses.identity_budget) if b is not None]
        self._budget = min(budgets) if budgets else None  # one caller, one identity: both budgets are one
        self._detector = od.StatefulDetector(self.defenses.detector) if self.defenses.detector else None
        self._secret = np.random.default_rng(seed).bytes(32)
        self._rng = np.random.default_rng(seed + 1)
        self._queries = 0
        self._blocked = False
        self.flagged_at: int | None = None  # the query count at the detector's first flag

    def _crops(self, images: torch.Tensor) -> np.ndarray:
        # As the service sees an uploaded image: 8-bit RGB at the model's input size.
        return to_uint8_rgb(images, self._embedder.input_size)

    def _embed(self, crops: np.ndarray) -> np.ndarray:
        return self._embedder.embed(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255)

    def score(self, images: torch.Tensor) -> np.ndarray:
        n = len(images)
        crops = self._crops(images)
        if self._blocked:
            raise KeyBlocked("key_blocked", "this caller was blocked by the query-pattern detector")
        try:
            if self.defenses.face_gate is not None:
                od.gate_faces(crops, self.defenses.face_gate)
            if self._detector is not None:
                self._check_pattern(crops, n)
        except od.QueryRefused as exc:
            raise _refused(exc.code, exc.reason) from None
        if self._budget is not None and self._queries + n > self._budget:
            raise BudgetExhausted(f"{n} images asked, {self._budget - self._queries} left of {self._budget}")
        raw = similarity(self._embed(crops), self._template)
        self._queries += n
        return od.transform_scores(raw, crops, "target", self.defenses, self._secret, self._rng).astype(np.float32)

    def _check_pattern(self, crops: np.ndarray, n: int) -> None:
        verdict = self._detector.observe("caller", crops)
        if verdict.flagged:
            if self.flagged_at is None:
                self.flagged_at = self._queries + n
            if self.defenses.detector.action == "block":
                self._blocked = True
                raise od.QueryRefused(403, "key_blocked", f"queries too close to earlier ones (mean k-NN "
                                      f"distance {verdict.distance:.3f})")

    @property
    def queries(self) -> int:
        return self._queries

    @property
    def budget_left(self) -> int | None:
        return None if self._budget is None else self._budget - self._queries


def encode_array(images: torch.Tensor) -> dict:
    """The API's compact image encoding: raw uint8 RGB, (N, H, W, 3), base64."""
    arr = np.ascontiguousarray(to_uint8_rgb(images, images.shape[-1]))
    return {"dtype": "uint8", "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


class HttpOracle:
    """A client of the similarity-oracle service for one target identity."""

    def __init__(self, url: str, key: str, identity: str, max_batch: int = 256, timeout: float = 60.0,
                 retries: int = 6, backoff: float = 0.5) -> None:
        import httpx

        self.identity = identity
        self.max_batch = max_batch
        self.retries = retries
        self.backoff = backoff
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                    headers={"Authorization": f"Bearer {key}"})
        self._queries = 0
        self._budget_left: int | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HttpOracle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, images: torch.Tensor) -> np.ndarray:
        out = [self._score_batch(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _score_batch(self, images: torch.Tensor) -> np.ndarray:
        body = {"array": encode_array(images)}
        path = f"/v1/identities/{self.identity}/similarity"
        for attempt in range(self.retries + 1):
            response = self._client.post(path, json=body)
            if response.status_code == 200:
                data = response.json()
                scores = np.asarray(data["scores"], dtype=np.float32)
                if len(scores) != len(images):
                    raise OracleError(f"asked {len(images)} scores, got {len(scores)}")
                self._queries += len(images)
                self._budget_left = data.get("budget_left")
                return scores
            code, reason = _reason(response)
            if response.status_code == 429 and "budget" in code:
                raise BudgetExhausted(reason)
            if code in ("no_face", "key_blocked"):
                raise _refused(code, reason)
            if response.status_code != 429 and response.status_code < 500:
                raise OracleError(f"HTTP {response.status_code}: {reason}")
            if attempt == self.retries:
                raise OracleError(f"HTTP {response.status_code} after {self.retries} retries: {reason}")
            wait = response.headers.get("Retry-After")
            time.sleep(float(wait) if wait else self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    @property
    def queries(self) -> int:
        return self._queries

    @property
    def budget_left(self) -> int | None:
        return self._budget_left


def _reason(response) -> tuple[str, str]:
    """(error code, "code: reason") of an error answer."""
    try:
        data = response.json()
        code = str(data.get("error", ""))
        return code, f"{code}: {data.get('reason', '')}".strip(": ")
    except ValueError:
        return "", response.text[:200]


__all__ = ["SimilarityOracle", "InProcessOracle", "HttpOracle", "OracleError", "BudgetExhausted", "QueryRefused",
           "KeyBlocked", "encode_array"]
