"""Face-recognition embedders: the one place the identity critic (metrics), the similarity
oracle service and the in-process oracle get their face embeddings from.

Every embedder maps a batch of RGB images (N, 3, H, W) in [0, 1] to L2-normalised
embeddings (N, D); the cosine of two embeddings is their similarity. Registered backends:

- `sface`: SFace (OpenCV model zoo), 112 x 112 aligned crops, the oracle's model. The
  shipped graph is int8 block-quantised and dequantises its weights on every call; it is
  loaded here with the weights dequantised once into float initialisers and a dynamic
  batch dimension (the same embeddings to 1e-6, several times faster; see `fast_sface`).
  The reference: every other SFace backend is measured against it.
- `sface-bf16`: the same SFace weights run by PyTorch/oneDNN in bfloat16, channels-last,
  batch-norms folded: 3-4x the images/s of `sface` on CPUs with native bf16 (AVX512-BF16 or
  AMX), every ORL face's embedding within cosine 0.9998 of the reference's (see
  `SFaceBF16Embedder`).
- `facenet`: FaceNet Inception-ResNet-v1 (CASIA-WebFace), 160 x 160 prewhitened, the
  independent critic that never answers an attacker.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path
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


def sface_layers(model) -> tuple[tuple[float, float], list[tuple]]:
    """The SFace chain of a `fast_sface` graph with every BatchNormalization folded into the
    Conv before it or the Gemm after it (in float64): ((mean, scale) of the input
    normalisation, layers), a layer being ("conv", W, b, stride, pad, groups), ("prelu", slope)
    or ("fc", W, b) acting on the (C, H, W)-flattened features. A graph of any other shape
    (not a chain, another op) is refused, so a changed asset cannot be run wrongly."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        elif node.op_type == "Reshape" and all(i in consts for i in node.input):
            consts[node.output[0]] = consts[node.input[0]].reshape(consts[node.input[1]])
        else:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    mean, scale = 0.0, 1.0
    layers: list[list] = []
    pending = None  # a batch-norm that follows a PRelu: folded into the next Gemm's input
    tensor = graph.input[0].name
    while tensor != graph.output[0].name:
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1:
            raise ValueError(f"SFace graph is not a chain at {tensor!r}")
        node = nxt[0]
        x, *params = [i for i in node.input if i]
        if x != tensor or any(p not in consts for p in params):
            raise ValueError(f"SFace graph: {node.op_type} {node.output[0]!r} has non-constant parameters")
        if node.op_type in ("Sub", "Mul") and not layers:
            c = float(consts[params[0]].reshape(()))
            if node.op_type == "Sub":
                mean += c / scale
            else:
                scale *= c
        elif node.op_type == "Conv":
            a = attrs(node)
            w = consts[params[0]].astype(np.float64)
            b = consts[params[1]].astype(np.float64) if len(params) > 1 else np.zeros(len(w))
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[:2] != pads[2:] or a.get("dilations", [1, 1]) != [1, 1]:
                raise ValueError(f"SFace conv {node.output[0]!r}: unsupported padding or dilation")
            layers.append(["conv", w, b, tuple(a.get("strides", [1, 1])), tuple(pads[:2]), int(a.get("group", 1))])
        elif node.op_type == "BatchNormalization":
            gamma, beta, mu, var = (consts[i].astype(np.float64) for i in params)
            k = gamma / np.sqrt(var + attrs(node).get("epsilon", 1e-5))
            shift = beta - mu * k
            if layers and layers[-1][0] in ("conv", "fc"):  # y = k (W x + b) + shift
                layers[-1][1] = layers[-1][1] * k.reshape(-1, *[1] * (layers[-1][1].ndim - 1))
                layers[-1][2] = layers[-1][2] * k + shift
            elif pending is None:
                pending = (k, shift)
            else:
                raise ValueError("SFace graph: two batch-norms in a row")
        elif node.op_type == "PRelu":
            layers.append(["prelu", consts[params[0]].reshape(-1).astype(np.float64)])
        elif node.op_type in ("Dropout", "Identity", "Flatten"):
            pass  # inference: identity; the flatten is the fc's (C, H, W) order
        elif node.op_type == "Gemm":
            a = attrs(node)
            if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise ValueError("SFace graph: unexpected Gemm attributes")
            w, b = consts[params[0]].astype(np.float64), consts[params[1]].astype(np.float64)
            if pending is not None:  # W (k x + shift) + b, k and shift per channel of (C, H, W)
                k, shift = (np.repeat(v, w.shape[1] // len(v)) for v in pending)
                w, b, pending = w * k[None, :], b + w @ shift, None
            layers.append(["fc", w, b])
        else:
            raise ValueError(f"SFace graph: unexpected op {node.op_type}")
        tensor = node.output[0]
    if pending is not None or not layers or layers[-1][0] != "fc":
        raise ValueError("SFace graph: does not end in a fully-connected layer")
    return (mean, scale), [tuple(layer) for layer in layers]


def _native_bf16() -> bool:
    """Does this CPU do bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16)? Without
    it oneDNN emulates bf16, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


class _SFaceNet(torch.nn.Module):
    """SFace as PyTorch modules (folded batch-norms). Takes (N, 3, 112, 112) RGB 0..255 (any
    memory format; channels-last is the fast one), returns the raw (N, 128) embeddings."""

    def __init__(self, normalisation: tuple[float, float], layers: list[tuple], dtype: torch.dtype) -> None:
        super().__init__()
        self.mean, self.scale = normalisation
        body: list[torch.nn.Module] = []
        channels = 3
        for layer in layers:
            if layer[0] == "conv":
                _, w, b, stride, pad, groups = layer
                conv = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, pad, groups=groups)
                conv.weight.data = torch.from_numpy(w.astype(np.float32))
                conv.bias.data = torch.from_numpy(b.astype(np.float32))
                body.append(conv)
                channels = w.shape[0]
            elif layer[0] == "prelu":
                prelu = torch.nn.PReLU(len(layer[1]))
                prelu.weight.data = torch.from_numpy(layer[1].astype(np.float32))
                body.append(prelu)
            else:
                _, w, b = layer
                side = int(round((w.shape[1] / channels) ** 0.5))
                if channels * side * side != w.shape[1]:
                    raise ValueError("SFace graph: the fc does not read square feature maps")
                # Read the features in channels-last order (H, W, C), as they lie in memory:
                # the flatten then costs no copy.
                w = w.reshape(len(w), channels, side, side).transpose(0, 2, 3, 1).reshape(len(w), -1)
                self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
                self.fc.weight.data = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
                self.fc.bias.data = torch.from_numpy(b.astype(np.float32))
        self.body = torch.nn.Sequential(*body)
        self.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body((x - self.mean) * self.scale)
        return self.fc(x.permute(0, 2, 3, 1).flatten(1))


class SFaceBF16Embedder:
    """SFace run by PyTorch (oneDNN) in bfloat16 with channels-last activations; registered
    as `sface-bf16`, the fast stand-in for the `sface` reference.

    Why it is fast: the reference's cost is not its convolutions. Profiled in onnxruntime,
    the 27 per-channel PRelus took half the time (its PRelu broadcast kernel runs at ~0.1 G
    elements/s) and the NCHWc reorders around each of them another sixth. PyTorch's PReLU is
    a vectorised kernel, oneDNN runs the depthwise and 1x1 convolutions channels-last with no
    reorders, and bf16 doubles the multiply-add rate where the CPU has AVX512-BF16 (or AMX).
    The batch-norms are folded into the convolutions and the fc in float64 when the model is
    built from the shipped asset (about a second, deterministic, so nothing is cached), and
    `embed` runs chunks of `chunk` images, small enough for a chunk's activations to stay in
    cache (8 measured best).

    Measured on 2 Zen4 cores (AVX512-BF16, no AMX), images/s at 8-64 images per call, median
    of 5 (reference `sface` in brackets): 1 thread ~175 (~42); two callers of 1 thread each,
    as the oracle service runs, ~345 (~78); one caller with 2 intra-op threads ~225 (~72).
    One image per call: 1 thread ~105 (~43), two callers ~190 (~90), but one caller with 2
    intra-op threads only ~65 (~73: OpenMP overhead). onnxruntime int8 (static, QDQ or
    QOperator, U8S8/S8S8, per-channel, with PRelu rewritten as Max(y, s y)) reached at best
    ~125 (1 thread) / ~200 (two callers) and fell to cosine 0.97-0.98 against the reference.

    Agreement with the reference, all 400 ORL faces at 112 x 112: per-image cosine min
    0.99983, mean 0.99992 (colour DCGAN faces and noise images: min 0.9994). ORL verification
    (templates: mean of 5 images per person, the other 5 as probes): same-person similarity
    0.7332 vs 0.7332, different 0.1092 vs 0.1093, AUC 0.99942 vs 0.99941, rank-1 0.980 vs
    0.980. The embeddings do not depend on the batch size or the thread count (to 1e-5).

    Where the CPU has no native bf16 it runs in float32 (`dtype` says which), as exact as the
    reference and about as fast. Threads: it runs on the process's torch intra-op threads; to
    call it from several threads at once (the oracle's micro-batcher), set
    torch.set_num_threads(1) first, as `server.oracle.backend.Backend` does, or the callers'
    OpenMP teams oversubscribe the cores. Concurrent calls are safe (forward is pure).
    """

    input_size = 112

    def __init__(self, dtype: torch.dtype | None = None, chunk: int = 8) -> None:
        self.dtype = dtype or (torch.bfloat16 if _native_bf16() else torch.float32)
        self.chunk = chunk
        normalisation, layers = sface_layers(fast_sface(str(assets.get("sface"))))
        self._net = _SFaceNet(normalisation, layers, self.dtype)

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB -> (N, 128) L2-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        out = []
        with torch.inference_mode():
            for part in x.split(self.chunk):
                # NHWC uint8 viewed as NCHW is already channels-last: no transpose copy.
                out.append(self._net(part.permute(0, 3, 1, 2).to(self.dtype)).float())
        return l2_normalise(torch.cat(out).numpy() if out else np.zeros((0, 128), np.float32))

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
EMBEDDERS.register("sface-bf16")(SFaceBF16Embedder)
EMBEDDERS.register("facenet")(FaceNetEmbedder)


@lru_cache(maxsize=4)
def embedder(name: str) -> FaceEmbedder:
    """The shared, lazily built embedder of a backend (one per process)."""
    return EMBEDDERS.get(name)()


__all__ = ["FaceEmbedder", "EMBEDDERS", "embedder", "cosine", "template_of", "similarity", "l2_normalise", "to_uint8_rgb",
           "SFaceEmbedder", "SFaceBF16Embedder", "FaceNetEmbedder", "fast_sface", "sface_layers"]
