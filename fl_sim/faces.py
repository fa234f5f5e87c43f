"""Face-recognition embedders: the one place the identity critic (metrics), the similarity
oracle service and the in-process oracle get their face embeddings from.

Every embedder maps a batch of RGB images (N, 3, H, W) in [0, 1] to L2-normalised
embeddings (N, D); the cosine of two embeddings is their similarity. Registered backends:

- `sface`: SFace (OpenCV model zoo), 112 x 112 aligned crops, the oracle's model. The
  shipped graph is int8 block-quantised and dequantises its weights on every call; it is
  loaded here with the weights dequantised once into float initialisers and a dynamic
  batch dimension (the same embeddings to 1e-6, several times faster; see `fast_sface`).
- `facenet`: FaceNet Inception-ResNet-v1 (CASIA-WebFace), 160 x 160 prewhitened, the
  independent critic that never answers an attacker.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim import assets
from fl_sim.registry import Registry


class FaceEmbedder(Protocol):
    name: str
    input_size: int  # the square side the model reads

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) RGB in [0, 1] -> (N, D) L2-normalised embeddings."""


def to_uint8_rgb(images: torch.Tensor, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 RGB: resized with antialiasing, as a camera pipeline would."""
    x = images.detach().float().cpu()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def l2_normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of L2-normalised embeddings (b may be one row)."""
    return (a * b).sum(axis=1)


def template_of(embeddings: np.ndarray) -> np.ndarray:
    """An enrolled identity's template: the normalised mean of its images' embeddings (D,)."""
    return l2_normalise(embeddings.astype(np.float32).mean(axis=0, keepdims=True))[0]


def similarity(embeddings: np.ndarray, template: np.ndarray) -> np.ndarray:
    """What a similarity oracle answers: the cosine of each embedding with the template (N,).
    The service and the in-process oracle both score with this function."""
    return cosine(embeddings, template[None, :]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# SFace


def _dequantised(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                 block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear (per-tensor, per-axis or blocked) on constants, in numpy."""
    q = q.astype(np.float32)
    scale = scale.astype(np.float32)
    zp = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    axis = axis % q.ndim
    if block_size:  # blocked: scale has ceil(dim / block) entries along `axis`
        scale = np.repeat(scale, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        return (q - zp) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def fast_sface(path: str):
    """The SFace graph with every constant DequantizeLinear folded into a float initialiser,
    unused inputs dropped and the batch dimension dynamic (an onnx.ModelProto).

    Why: the shipped graph keeps int8 weights and dequantises them at every call, which
    costs more than the convolutions at batch 1 and pins the batch at one image."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    keep, folded = [], {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(i in consts for i in node.input if i):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            folded[node.output[0]] = _dequantised(consts[node.input[0]], consts[node.input[1]], zp,
                                                  int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in folded.items())
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    alive = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)
    for graph_input in [i for i in graph.input if i.name not in used]:
        graph.input.remove(graph_input)
    for value in list(graph.input) + list(graph.output):
        if value.name in ("data", "fc1"):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


class SFaceEmbedder:
    """SFace (OpenCV model zoo), 112 x 112 aligned RGB crops in 0..255; the oracle's model."""

    name = "sface"
    input_size = 112

    def __init__(self, threads: int = 1, quantised: bool = False) -> None:
        import onnx
        import onnxruntime as ort

        if quantised:  # the shipped graph as it is (for measuring the speed-up)
            model = onnx.load(str(assets.get("sface")))
            consumed = {i for node in model.graph.node for i in node.input}
            for graph_input in [i for i in model.graph.input if i.name not in consumed]:
                model.graph.input.remove(graph_input)
        else:
            model = fast_sface(str(assets.get("sface")))
        self.batched = not quantised
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB -> (N, 128) L2-normalised."""
        x = np.ascontiguousarray(images.astype(np.float32).transpose(0, 3, 1, 2))
        if self.batched:
            out = self._session.run(None, {"data": x})[0]
        else:
            out = np.stack([self._session.run(None, {"data": img[None]})[0].reshape(-1) for img in x])
        return l2_normalise(out.reshape(len(x), -1).astype(np.float32))

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return self.embed_uint8(to_uint8_rgb(images, self.input_size))


# ---------------------------------------------------------------------------------------
# FaceNet


class FaceNetEmbedder:
    """FaceNet Inception-ResNet-v1 (CASIA-WebFace), 160 x 160 prewhitened; the critic."""

    name = "facenet"
    input_size = 160

    def __init__(self) -> None:
        import cv2

        self._net = cv2.dnn.readNetFromTensorflow(str(assets.get("facenet")))
        # One cv2.dnn.Net must not run in two threads at once (its buffers are shared; seen
        # failing with "buf.shape() == m.shape()"), and the embedder is shared per process.
        self._lock = threading.Lock()

    def embed(self, images: torch.Tensor) -> np.ndarray:
        x = to_uint8_rgb(images, self.input_size).astype(np.float32)
        # FaceNet's prewhitening: per image zero mean, unit variance (std floored).
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), 1.0 / np.sqrt(x[0].size))
        blob = np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))
        out = []
        with self._lock:
            for img in blob:  # the frozen graph's reshape fixes the batch at one
                self._net.setInput(img[None])
                out.append(self._net.forward().reshape(-1))
        return l2_normalise(np.stack(out))


EMBEDDERS: Registry[Callable[[], FaceEmbedder]] = Registry("face-recognition backend")
EMBEDDERS.register("sface")(SFaceEmbedder)
EMBEDDERS.register("facenet")(FaceNetEmbedder)


@lru_cache(maxsize=4)
def embedder(name: str) -> FaceEmbedder:
    """The shared, lazily built embedder of a backend (one per process)."""
    return EMBEDDERS.get(name)()


__all__ = ["FaceEmbedder", "EMBEDDERS", "embedder", "cosine", "template_of", "similarity", "l2_normalise", "to_uint8_rgb",
           "SFaceEmbedder", "FaceNetEmbedder", "fast_sface"]
