"""The face-recognition backend behind the oracle: an embedder from fl_sim.faces' registry,
templates (the normalised mean of an identity's image embeddings) and scores (cosine), with
the same functions attacks.oracle.InProcessOracle uses, so both answer alike.
"""
from __future__ import annotations

import threading

import numpy as np

from fl_sim.faces import embedder, similarity, template_of


class Backend:
    """One embedder shared by the request threads; at most `threads` embed at once."""

    def __init__(self, name: str, threads: int = 2) -> None:
        import torch

        torch.set_num_threads(1)
        self.name = name
        self.embedder = embedder(name)
        self.size = int(self.embedder.input_size)
        self._slots = threading.BoundedSemaphore(threads)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB -> (N, D) float32 L2-normalised embeddings."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
        with self._slots:
            out = self.embedder.embed(x)
        return np.asarray(out, dtype=np.float32)

    def template(self, crops: np.ndarray) -> np.ndarray:
        """An identity's template: the normalised mean of its images' embeddings."""
        return template_of(self.embed(crops))

    def scores(self, crops: np.ndarray, template: np.ndarray) -> list[float]:
        return [float(s) for s in similarity(self.embed(crops), template)]


__all__ = ["Backend"]
