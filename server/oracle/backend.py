"""The face-recognition backend behind the oracle: an embedder from fl_sim.faces' registry,
templates (the normalised mean of an identity's image embeddings) and scores (cosine), with
the same functions attacks.oracle.InProcessOracle uses, so both answer alike.

Concurrent requests are micro-batched: request threads queue their crops in pieces of at
most `max_images` images (so a large request is shared by all workers instead of keeping
one busy while the other idles), and each of `threads` workers takes whatever is queued,
up to `max_images` in all, into one model call (16 by default: SFace's images per second are
flat from 8 to 64 per call, and a cap keeps a greedy worker from starving the others). There is no waiting for a batch to fill: while the
workers are busy, requests pile up and the next call takes them together, so a lone request
pays no extra latency and a crowd of one-image requests runs at the model's batched speed.
(Neither onnxruntime nor the web stack offers this; it is a queue and a few threads.)
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from fl_sim.faces import embedder, similarity, template_of


@dataclass
class _Job:
    crops: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Runs `embed` ((N, S, S, 3) uint8 -> (N, D)) on the crops of many callers at once."""

    def __init__(self, embed, workers: int = 2, max_images: int = 16) -> None:
        self._embed = embed
        self.max_images = max_images
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.calls = 0  # model calls made (for tests and benchmarks)
        self.images = 0
        self._workers = [threading.Thread(target=self._work, name=f"oracle-embed-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def embed(self, crops: np.ndarray) -> np.ndarray:
        jobs = [_Job(crops[i:i + self.max_images]) for i in range(0, len(crops), self.max_images)]
        for job in jobs:
            self._queue.put(job)
        for job in jobs:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error
        return jobs[0].result if len(jobs) == 1 else np.concatenate([j.result for j in jobs])

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, n = [job], len(job.crops)
            while n < self.max_images:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # closing: let this worker finish the batch, then stop
                    self._queue.put(None)
                    break
                if n + len(more.crops) > self.max_images:  # not this call's: back to the queue's end
                    self._queue.put(more)
                    break
                jobs.append(more)
                n += len(more.crops)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            out = self._embed(np.concatenate([j.crops for j in jobs]) if len(jobs) > 1 else jobs[0].crops)
            self.calls += 1
            self.images += len(out)
            start = 0
            for j in jobs:
                j.result = out[start:start + len(j.crops)]
                start += len(j.crops)
        except BaseException as exc:  # every waiting request hears of the failure
            for j in jobs:
                j.error = exc
        finally:
            for j in jobs:
                j.done.set()


class Backend:
    """One embedder shared by the request threads through a micro-batcher of `threads` workers."""

    def __init__(self, name: str, threads: int = 2, max_images: int = 16) -> None:
        import torch

        torch.set_num_threads(1)
        self.name = name
        self.embedder = embedder(name)
        self.size = int(self.embedder.input_size)
        self.batcher = MicroBatcher(self._embed_now, workers=threads, max_images=max_images)

    def _embed_now(self, crops: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
        return np.asarray(self.embedder.embed(x), dtype=np.float32)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB -> (N, D) float32 L2-normalised embeddings."""
        return self.batcher.embed(crops)

    def template(self, crops: np.ndarray) -> np.ndarray:
        """An identity's template: the normalised mean of its images' embeddings."""
        return template_of(self.embed(crops))

    def scores(self, crops: np.ndarray, template: np.ndarray) -> np.ndarray:
        return similarity(self.embed(crops), template)


__all__ = ["Backend", "MicroBatcher"]
