"""The gradient-inversion engine.

Pieces, each usable alone:

- `VictimModel`: the global model as the client ran it (BatchNorm in the client's mode, on the
  batch statistics in train mode; dropout off, its mask is unknowable), the input
  normalisation, and `simulate(x, labels)`: the update images x would have produced, FedSGD
  gradient or FedAvg weight difference unrolled differentiably over the local SGD steps.
- `matching_loss`: L2 or cosine between simulated and observed updates with per-layer weights,
  in one fused autograd function (the target's norm computed once, no temporaries the size
  of the model in the forward, one in the backward).
- regularisers: total variation, L2 norm, BatchNorm statistics.
- `GradientInversion`: the optimisation loop (Adam, optionally on the signed gradient, box
  constraint in pixel space, lr schedules, restarts keeping the best, the best iterate of a
  run returned) with hooks a subclass overrides: `initial_images`, `on_iteration` (may replace
  the image), `pixel_grad_scale` (a per-pixel multiplier of the step direction), `select`
  (which iterate of a restart is returned, and its alternatives) and `diagnostics`.

Every restart's returned image is scored once more, clamped to [0, 1] as returned and with the
exact matching formulation (`score`): that value is the result's `final_loss` and decides
which restart is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackResult, Progress, StopFlag, report, stopped
from attacks.case import AttackCase
from attacks.expanded import supports
from attacks.labels import case_labels
from fl_sim.training import batchnorm_layers

Objective = Literal["l2", "cosine", "cosine-layer"]
Schedule = Literal["none", "step", "cosine"]
Init = Literal["randn", "rand", "constant", "tensor"]


# --------------------------------------------------------------------------------------------
# The victim model
# --------------------------------------------------------------------------------------------
class VictimModel:
    """The model the client trained, as a differentiable map images -> update."""

    def __init__(self, case: AttackCase, device: str | torch.device = "cpu",
                 channels_last: bool = False) -> None:
        self.case = case
        self.device = torch.device(device)
        model = case.build_model()
        self.bn_modules = batchnorm_layers(model)
        # The server's running statistics: the prior of the BatchNorm regulariser.
        self.bn_running = [(m.running_mean.detach().clone().to(self.device),
                            m.running_var.detach().clone().to(self.device))
                           for m in self.bn_modules if m.running_mean is not None]
        if case.bn_mode == "train":
            # Batch statistics always, no running-stat updates (so nothing mutates per
            # iteration and the model works under torch.func transforms).
            torch.func.replace_all_batch_norm_modules_(model)
        for m in model.modules():
            if isinstance(m, nn.Dropout | nn.Dropout2d | nn.AlphaDropout):
                m.eval()
        model = model.to(self.device)
        self.channels_last = channels_last and model_has_conv(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.names = case.parameter_names(model)
        params = dict(model.named_parameters())
        self.all_names = list(params)
        for p in params.values():
            p.requires_grad_(True)
        self.params = [params[n] for n in self.names]
        c = case.image_shape[0]
        self.mean = torch.tensor(case.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(case.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._bn_inputs: list[torch.Tensor] = []
        self._hooks: list[Any] = []

    # -- images ------------------------------------------------------------------------------
    @property
    def param_channels(self) -> int:
        """Channels of the optimised image: 1 for grey cases (replicated in the forward)."""
        return 1 if self.case.grey else self.case.image_shape[0]

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        c = self.case.image_shape[0]
        return x.expand(-1, c, -1, -1) if x.shape[1] != c else x

    def from_rgb(self, img: torch.Tensor) -> torch.Tensor:
        """An image of the case's shape to the optimised parametrisation."""
        if self.case.grey and img.shape[1] != 1:
            return img.mean(dim=1, keepdim=True)
        return img

    def param_to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """The optimised variable lives in the normalised space (as in the published code, so
        the published step sizes mean the same); this maps it to pixels."""
        c = z.shape[1]
        return z * self.std[:, :c] + self.mean[:, :c]

    def pixels_to_param(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return (x - self.mean[:, :c]) / self.std[:, :c]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        inp = (self.to_rgb(x) - self.mean) / self.std
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        return inp

    # -- the update --------------------------------------------------------------------------
    def targets(self) -> list[torch.Tensor]:
        return [self.case.update[n].detach().to(self.device, torch.float32) for n in self.names]

    def simulate(self, x: torch.Tensor, labels: torch.Tensor, create_graph: bool = True) -> list[torch.Tensor]:
        """The update (same kind as the case's) that pixel images x with labels would give."""
        inp = self.normalise(x)
        if self.case.update_kind == "gradient":
            loss = F.cross_entropy(self.model(inp), labels)
            return list(torch.autograd.grad(loss, self.params, create_graph=create_graph))
        return self._unroll(inp, labels, create_graph)

    def _unroll(self, inp: torch.Tensor, labels: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        """FedAvg: the client's local SGD steps, differentiable in the images.

        Step s uses minibatch s of the images in order (wrapping around), the order a client
        without shuffling uses; the difference w_S - w_0 = -lr * sum_s g_s is accumulated from
        the gradients (no cancellation between two nearly equal weight tensors).
        """
        case = self.case
        n = inp.shape[0]
        b = case.local_batch_size if 0 < case.local_batch_size < n else n
        base = dict(self.model.named_parameters())
        current = dict(base)
        total: dict[str, torch.Tensor] = {}
        names = self.all_names
        for s in range(case.local_steps):
            idx = [(s * b + j) % n for j in range(b)]
            batch = inp[idx] if b < n else inp
            out = torch.func.functional_call(self.model, current, (batch,))
            loss = F.cross_entropy(out, labels[idx] if b < n else labels)
            grads = torch.autograd.grad(loss, [current[k] for k in names], create_graph=create_graph,
                                        allow_unused=True)
            for k, g in zip(names, grads):
                if g is None:
                    continue
                total[k] = total[k] + g if k in total else g
                current[k] = current[k] - case.local_lr * g
        return [-case.local_lr * total[k] if k in total else torch.zeros_like(base[k]) for k in self.names]

    # -- functional form (for torch.func.vmap over candidates or victims) ------------------------
    def param_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def functional_update(self, params: dict[str, torch.Tensor], inp: torch.Tensor,
                          labels: torch.Tensor) -> list[torch.Tensor]:
        """The update of normalised input `inp` with torch.func only (vmap-able): the same
        quantity as `simulate`, parameters passed explicitly."""
        case = self.case

        def loss_fn(p: dict[str, torch.Tensor], batch: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(self.model, p, (batch,)), y)

        if case.update_kind == "gradient":
            g = torch.func.grad(loss_fn)(params, inp, labels)
            return [g[k] for k in self.names]
        n = inp.shape[0]
        b = case.local_batch_size if 0 < case.local_batch_size < n else n
        current = dict(params)
        total: dict[str, torch.Tensor] = {}
        for s in range(case.local_steps):
            idx = [(s * b + j) % n for j in range(b)]
            g = torch.func.grad(loss_fn)(current, inp[idx] if b < n else inp, labels[idx] if b < n else labels)
            for k, gk in g.items():
                total[k] = total[k] + gk if k in total else gk
                current[k] = current[k] - case.local_lr * gk
        return [-case.local_lr * total[k] for k in self.names]

    # -- BatchNorm statistics ----------------------------------------------------------------
    def record_bn_inputs(self, on: bool) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if on:
            def hook(module, args):
                self._bn_inputs.append(args[0])
            self._hooks = [m.register_forward_pre_hook(hook) for m in self.bn_modules]

    def bn_loss(self) -> torch.Tensor:
        """DeepInversion's prior: batch statistics of the dummy images vs the running ones."""
        inputs, self._bn_inputs = self._bn_inputs, []
        total = torch.zeros((), device=self.device)
        for a, (rm, rv) in zip(inputs, self.bn_running):
            dims = [0] + list(range(2, a.dim()))
            mu = a.mean(dim=dims)
            var = a.var(dim=dims, unbiased=False)
            total = total + torch.linalg.vector_norm(mu - rm) + torch.linalg.vector_norm(var - rv)
        return total


def model_has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Gradient matching
# --------------------------------------------------------------------------------------------
def layer_weights(spec: str | Sequence[float], n: int) -> list[float]:
    """Per-layer weights: equal, linear (first layer heaviest, as Geiping's 'linear'), exp
    (softmax of the same ramp), or an explicit list."""
    if isinstance(spec, str):
        if spec == "equal":
            return [1.0] * n
        ramp = torch.arange(n, 0, -1, dtype=torch.float64)
        if spec == "linear":
            return (ramp / n).tolist()
        if spec == "exp":
            return torch.softmax(ramp, dim=0).tolist()
        raise ValueError(f"unknown layer_weights {spec!r}; choose equal, linear, exp or a list")
    w = [float(v) for v in spec]
    if len(w) != n:
        raise ValueError(f"layer_weights has {len(w)} entries, the update has {n} tensors")
    return w


_EXACT_BELOW = 1e-3  # relative loss under which the matching loss is computed from differences


class _Matching(torch.autograd.Function):
    """Fused gradient-matching loss over a list of tensors.

    forward: per-layer dot products <g,g>, <g,t> (no temporaries away from the optimum);
    backward: one tensor per layer, a*t + b*g. Target norms come precomputed. Not differentiable twice (never needed:
    the image gradient goes through the graph of g, not through this backward).
    """

    @staticmethod
    def forward(ctx, kind: str, weights: list[float], targets: list[torch.Tensor], tt: list[float],
                *gs: torch.Tensor) -> torch.Tensor:
        gs_flat = [g.reshape(-1) for g in gs]
        ts_flat = [t.reshape(-1) for t in targets]
        w = torch.tensor(weights, dtype=torch.float64, device=gs[0].device)
        # Dot products only (no temporaries): <g,g> and <g,t> per layer. Near the optimum the
        # expanded forms cancel in float32 (1 - cos bottoms out at ~1e-7 and stops guiding),
        # so there the loss is recomputed from the difference, |g/|g| - t/|t||^2 / 2 for cosine
        # and |g - t|^2 for L2: one temporary per layer, only when it matters.
        gg = torch.stack([torch.dot(g, g) for g in gs_flat]).double()
        gt = torch.stack([torch.dot(g, t) for g, t in zip(gs_flat, ts_flat)]).double()
        ttt = torch.tensor(tt, dtype=torch.float64, device=gg.device)
        if kind == "l2":
            dd = gg - 2 * gt + ttt
            if float((w * dd).sum()) < _EXACT_BELOW * float((w * (gg + ttt)).sum()):
                dd = torch.stack([torch.dot(d, d) for d in (g - t for g, t in zip(gs_flat, ts_flat))]).double()
            loss = (w * dd).sum()
            coef_t = (-2 * w).tolist()
            coef_g = (2 * w).tolist()
        elif kind == "cosine":
            ng = (w * gg).sum().clamp_min(1e-30).sqrt()
            nt = (w * ttt).sum().clamp_min(1e-30).sqrt()
            loss = 1 - (w * gt).sum() / (ng * nt)
            if float(loss) < _EXACT_BELOW:
                ratio = float(ng / nt)
                dd = torch.stack([torch.dot(d, d) for d in (torch.sub(g, t, alpha=ratio)
                                                            for g, t in zip(gs_flat, ts_flat))]).double()
                loss = 0.5 * (w * dd).sum() / (ng * ng)
            cos = 1 - loss
            coef_t = (-w / (ng * nt)).tolist()
            coef_g = (w * cos / (ng * ng)).tolist()
        elif kind == "cosine-layer":
            ng = gg.clamp_min(1e-30).sqrt()
            nt = ttt.clamp_min(1e-30).sqrt()
            per_layer = 1 - gt / (ng * nt)
            near = (per_layer < _EXACT_BELOW).tolist()
            if any(near):
                ratio = (ng / nt).tolist()
                for i, (g, t) in enumerate(zip(gs_flat, ts_flat)):
                    if near[i]:
                        d = torch.sub(g, t, alpha=ratio[i])
                        per_layer[i] = 0.5 * torch.dot(d, d).double() / (ng[i] * ng[i])
            loss = (w * per_layer).sum() / w.sum()
            cos = 1 - per_layer
            coef_t = (-w / (ng * nt) / w.sum()).tolist()
            coef_g = (w * cos / (ng * ng) / w.sum()).tolist()
        else:  # pragma: no cover - validated by the config
            raise ValueError(kind)
        ctx.coefs = (coef_t, coef_g)
        ctx.targets = targets
        ctx.save_for_backward(*gs)
        return loss.to(gs[0].dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gs = ctx.saved_tensors
        coef_t, coef_g = ctx.coefs
        go = float(grad_out)
        out = []
        for g, t, a, b in zip(gs, ctx.targets, coef_t, coef_g):
            a, b = a * go, b * go
            if a == 0.0:
                out.append(g * b)
            else:
                out.append(torch.add(t, g, alpha=b / a).mul_(a))
        return (None, None, None, None, *out)


class GradientMatcher:
    """L2 / cosine distance to a fixed observed update; the target's norms computed once."""

    def __init__(self, targets: list[torch.Tensor], kind: Objective = "cosine",
                 weights: str | Sequence[float] = "equal", scale: float = 1.0) -> None:
        if kind not in ("l2", "cosine", "cosine-layer"):
            raise ValueError(f"unknown objective {kind!r}; choose l2, cosine or cosine-layer")
        self.targets = targets
        self.kind = kind
        self.weights = layer_weights(weights, len(targets))
        self.tt = [float(torch.dot(t.reshape(-1), t.reshape(-1))) for t in targets]
        self.scale = scale

    def __call__(self, gs: Sequence[torch.Tensor]) -> torch.Tensor:
        loss = _Matching.apply(self.kind, self.weights, self.targets, self.tt, *gs)
        return loss * self.scale if self.scale != 1.0 else loss

    def reference(self, gs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The same loss in plain autograd ops, in float64 (for tests)."""
        w = self.weights
        gs = [g.double() for g in gs]
        targets = [t.double() for t in self.targets]
        if self.kind == "l2":
            loss = sum(wi * (g - t).pow(2).sum() for wi, g, t in zip(w, gs, targets))
        elif self.kind == "cosine":
            dot = sum(wi * (g * t).sum() for wi, g, t in zip(w, gs, targets))
            ng = sum(wi * g.pow(2).sum() for wi, g in zip(w, gs)).sqrt()
            nt = sum(wi * t.pow(2).sum() for wi, t in zip(w, targets)).sqrt()
            loss = 1 - dot / (ng * nt)
        else:
            loss = sum(wi * (1 - F.cosine_similarity(g.reshape(-1), t.reshape(-1), dim=0, eps=1e-15))
                       for wi, g, t in zip(w, gs, targets)) / sum(w)
        return loss * self.scale


def reference_objective(case: AttackCase, images: torch.Tensor, labels: torch.Tensor, config: "InversionConfig") -> float:
    """The objective of images as a result returns them ((N, C, H, W) in [0, 1], the case's
    channels) recomputed in plain ops: a fresh victim model, the matching loss in float64
    (`GradientMatcher.reference`), the priors. For tests of `AttackResult.final_loss`."""
    victim = VictimModel(case)
    x = images.detach().float()
    if victim.param_channels == 1:
        x = x[:, :1]  # grey results replicate one channel: take it as it is (no mean rounding)
    labels = torch.as_tensor(labels, dtype=torch.long)
    matcher = GradientMatcher(victim.targets(), config.objective, config.layer_weights, config.objective_scale)
    victim.record_bn_inputs(config.bn_stats > 0)
    loss = matcher.reference(victim.simulate(x, labels, create_graph=False))
    inp = victim.normalise(x).double()
    loss = loss + config.tv * total_variation(inp) + config.l2 * l2_norm(inp)
    if config.bn_stats > 0:
        loss = loss + config.bn_stats * victim.bn_loss()
    victim.record_bn_inputs(False)
    return float(loss.detach())


def matching_precision(setting: str, device: str | torch.device, bn_train: bool) -> str:
    """The factored matching's precision for a config's `precision`: "auto" is bf16 where the
    device has fast bf16 kernels and BatchNorm runs on its running statistics (see
    attacks.factored), else fp32."""
    if setting != "auto":
        return setting
    from attacks.factored import bf16_supported

    return "bf16" if bf16_supported(device) and not bn_train else "fp32"


def factored_masks(defense_model) -> dict[str, torch.Tensor] | None:
    """What the factored matching needs to model an adaptive attack's defense model: {} for no
    model, the masks of a zeroing one (fl_sim.defenses.ZeroPattern); None when it cannot (the
    exact path must apply the model)."""
    if defense_model is None:
        return {}
    from fl_sim.defenses import ZeroPattern

    return dict(defense_model.masks) if isinstance(defense_model, ZeroPattern) else None


def exact_threshold(matcher: GradientMatcher) -> float:
    """The matching loss under which the factored forms (attacks.factored) lose precision in
    float32: 1 - cos below 1e-3; for L2 (|g|^2 - 2<g,t> + |t|^2, whose float32 terms carry
    errors of ~1e-4 of |t|^2) below a tenth of the target's squared norm."""
    if matcher.kind == "l2":
        return 0.1 * matcher.scale * sum(w * t for w, t in zip(matcher.weights, matcher.tt))
    return _EXACT_BELOW * matcher.scale


# --------------------------------------------------------------------------------------------
# Image priors
# --------------------------------------------------------------------------------------------
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic, Geiping et al.)."""
    dx = (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean()
    dy = (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()
    return dx + dy


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


# --------------------------------------------------------------------------------------------
# The optimisation-based attack
# --------------------------------------------------------------------------------------------
@dataclass
class InversionConfig:
    """Hyper-parameters of an optimisation-based gradient inversion."""

    iterations: int = 5000
    restarts: int = 1
    objective: Objective = "cosine"
    layer_weights: str | list[float] = "equal"
    objective_scale: float = 1.0
    tv: float = 0.0  # total variation (on the normalised model input)
    l2: float = 0.0  # L2 norm of the normalised model input
    bn_stats: float = 0.0  # BatchNorm statistics vs the server's running statistics
    lr: float = 0.1
    optimizer: Literal["adam", "sgd"] = "adam"
    signed: bool = False  # step on the sign of the image gradient
    box: bool = True  # keep pixels in [0, 1] after every step
    schedule: Schedule = "none"
    warmup: int = 0  # linear lr warm-up iterations
    init: Init = "randn"  # randn: N(0, 1) in the normalised space; rand: U[0, 1] pixels
    init_value: float = 0.5  # init = constant
    init_image: torch.Tensor | None = None  # init = tensor: (N, C, H, W) or (C, H, W) pixels
    label_rule: Literal["auto", "sign", "negative-bias", "count"] = "auto"
    seed: int = 0
    channels_last: bool = False
    # FedSGD: match without materialising the parameter gradients (attacks.factored) while far
    # from the optimum; the same loss and image gradient up to float rounding, 1.3-3x faster.
    fast: bool = True
    # The factored matching's convolutions and GEMMs in bfloat16 ("auto": where the device
    # runs bf16 on fast kernels and BatchNorm is frozen; reductions stay in float32/64).
    # `fl-sim bench attack --against breaching` measures it: speed, and PSNR at a fixed
    # iteration count beside the exact fp32 path.
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    num_threads: int = 0  # 0: leave torch's setting alone
    # Adaptive: model the clients' defenses (case.defenses) on every trial gradient, with the
    # defenses' own transforms (fl_sim.defenses: differentiable, straight-through where not),
    # their unknown parameters estimated from the observed update. False: the naive attack.
    adaptive: bool = False

    def __post_init__(self) -> None:
        choices = {"objective": ("l2", "cosine", "cosine-layer"), "schedule": ("none", "step", "cosine"),
                   "init": ("randn", "rand", "constant", "tensor"), "optimizer": ("adam", "sgd"),
                   "label_rule": ("auto", "sign", "negative-bias", "count"), "precision": ("fp32", "bf16", "auto")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} = {getattr(self, key)!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError("iterations and restarts must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        for key in ("tv", "l2", "bn_stats"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0")
        if self.init == "tensor" and self.init_image is None:
            raise ValueError("init = 'tensor' needs init_image")
        if isinstance(self.layer_weights, str):
            layer_weights(self.layer_weights, 1)  # validates the name


@dataclass
class InversionContext:
    """What the loop and its hooks share for one attack run."""

    case: AttackCase
    victim: VictimModel
    matcher: GradientMatcher
    labels: torch.Tensor
    labels_recovered: bool
    config: InversionConfig
    device: torch.device
    total_iterations: int
    restart: int = 0
    generator: torch.Generator | None = None
    state: dict[str, Any] = field(default_factory=dict)  # free for subclasses' hooks


@dataclass
class RestartOutcome:
    """What one restart of the loop produced (pixel images with C' channels, unclamped)."""

    best: torch.Tensor  # the lowest-loss iterate (the loss as evaluated during the run)
    best_loss: float
    final: torch.Tensor  # the last iterate (where the optimisation stopped)
    final_loss: float  # its loss; inf when stopped before it was evaluated
    history: list[float]  # the loss of the image each iteration started from
    iterations: int
    interrupted: bool


class GradientInversion(Attack):
    """Optimise dummy images so that their simulated update matches the observed one."""

    Config = InversionConfig

    # -- hooks for subclasses ----------------------------------------------------------------
    def initial_images(self, ctx: InversionContext) -> torch.Tensor:
        """Pixel images (N, C', H, W) to start restart `ctx.restart` from (C' = 1 if grey)."""
        cfg = ctx.config
        c = ctx.victim.param_channels
        _, h, w = ctx.case.image_shape
        shape = (ctx.case.num_images, c, h, w)
        g = ctx.generator
        if cfg.init == "randn":
            z = torch.randn(shape, generator=g)
            mean = ctx.victim.mean.cpu()[:, :c]
            std = ctx.victim.std.cpu()[:, :c]
            x = z * std + mean
        elif cfg.init == "rand":
            x = torch.rand(shape, generator=g)
        elif cfg.init == "constant":
            x = torch.full(shape, float(cfg.init_value))
        else:
            img = torch.as_tensor(cfg.init_image, dtype=torch.float32)
            if img.dim() == 3:
                img = img.unsqueeze(0)
            if img.shape[-2:] != (h, w):
                img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            img = ctx.victim.from_rgb(img)
            if img.shape[0] == 1 and shape[0] > 1:
                img = img.expand(shape[0], -1, -1, -1)
            if tuple(img.shape) != shape:
                raise ValueError(f"init_image has shape {tuple(img.shape)}, expected {shape}")
            x = img.clone()
        if cfg.box:
            x = x.clamp(0, 1)
        return x.to(ctx.device)

    def on_iteration(self, ctx: InversionContext, it: int, x: torch.Tensor, loss: float) -> torch.Tensor | None:
        """Called after each step with the current image; return a tensor to replace it."""
        return None

    def on_iterations(self, ctxs: list[InversionContext], it: int, xs: list[torch.Tensor] | torch.Tensor,
                      losses: list[float]) -> list[torch.Tensor | None]:
        """`on_iteration` for victims attacked together (attacks.multi); an attack may do
        their work as one batch (DFLeak restores them in one fit)."""
        return [self.on_iteration(ctx, it, x, loss) for ctx, x, loss in zip(ctxs, xs, losses)]

    def pixel_grad_scale(self, ctx: InversionContext, it: int, x: torch.Tensor) -> torch.Tensor | None:
        """A per-pixel multiplier of the step direction (after the sign), or None."""
        return None

    def select(self, ctx: InversionContext, outcome: RestartOutcome) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """At the end of a restart: the pixel images it returns (C' channels) and alternatives
        by name (the result's `variants` when this restart is kept). The engine's rule: the
        lowest-loss iterate, no alternatives."""
        return outcome.best, {}

    def diagnostics(self, ctx: InversionContext, restart: int) -> dict[str, float]:
        """Attack-specific numbers for the reader, at the end of the run; `restart` is the kept one."""
        return {}

    def score(self, ctx: InversionContext, x: torch.Tensor) -> float:
        """The objective of pixel images x (C' channels) as the result returns them: clamped to
        [0, 1], matched with the exact formulation (materialised gradients, not the factored
        speed path)."""
        fast = ctx.state.get("factored")
        ctx.state["factored"] = None
        try:
            return float(self.objective(ctx, x.detach().clamp(0, 1)).detach())
        finally:
            ctx.state["factored"] = fast

    # -- the objective -----------------------------------------------------------------------
    def objective(self, ctx: InversionContext, x: torch.Tensor) -> torch.Tensor:
        cfg = ctx.config
        victim = ctx.victim
        if cfg.bn_stats > 0:
            victim._bn_inputs = []
        loss = self.matching(ctx, x)
        if cfg.tv > 0 or cfg.l2 > 0:
            inp = victim.normalise(x)
            if cfg.tv > 0:
                loss = loss + cfg.tv * total_variation(inp)
            if cfg.l2 > 0:
                loss = loss + cfg.l2 * l2_norm(inp)
        if cfg.bn_stats > 0:
            loss = loss + cfg.bn_stats * victim.bn_loss()
        return loss

    def matching(self, ctx: InversionContext, x: torch.Tensor) -> torch.Tensor:
        """The gradient-matching term of pixel images x: factored while far from the optimum
        (when available), exact (materialised gradients, no cancellation) near it."""
        fast = ctx.state.get("factored")
        if fast is not None:
            loss = fast(ctx.victim.normalise(x).unsqueeze(0), ctx.labels.unsqueeze(0))[0]
            if float(loss.detach()) >= ctx.state["exact_below"]:
                return loss
            ctx.state["factored"] = None  # from now on the exact formulation
        gs = ctx.victim.simulate(x, ctx.labels)
        defended = ctx.state.get("defense_model")
        if defended is not None:
            names = ctx.victim.names
            trial = defended(dict(zip(names, gs)))
            gs = [trial[n] for n in names]
        return ctx.matcher(gs)

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, case: AttackCase, device: str | torch.device = "cpu", victim: VictimModel | None = None,
                fast: bool = True) -> InversionContext:
        """The context of one attack run. `victim`: reuse a model built for a compatible case
        (same architecture, weights and training settings; attacking victims together)."""
        cfg = self.config
        device = torch.device(device)
        if victim is None:
            victim = VictimModel(case, device, channels_last=cfg.channels_last)
        labels, recovered = case_labels(case, victim.model, cfg.label_rule)
        targets = [case.update[n].detach().to(device, torch.float32) for n in victim.names]
        matcher = GradientMatcher(targets, cfg.objective, cfg.layer_weights, cfg.objective_scale)
        victim.record_bn_inputs(cfg.bn_stats > 0)
        ctx = InversionContext(case=case, victim=victim, matcher=matcher, labels=labels.to(device),
                               labels_recovered=recovered, config=cfg, device=device,
                               total_iterations=cfg.iterations * cfg.restarts)
        if cfg.adaptive and case.defenses:
            from fl_sim.defenses import adaptive_model_of

            ctx.state["defense_model"] = adaptive_model_of(case.defenses, dict(zip(victim.names, targets)))
        masks = factored_masks(ctx.state.get("defense_model"))
        if masks is None:
            return ctx  # the factored path models no other defense: the exact path applies the model
        if fast and cfg.fast and case.update_kind == "gradient" and cfg.bn_stats == 0 and supports(victim.model) is None:
            from attacks.factored import FactoredMatcher

            ctx.state["factored"] = ctx.state["factored_matcher"] = FactoredMatcher(
                victim.model, case.bn_mode == "train", victim.names, [t.unsqueeze(0) for t in matcher.targets],
                matcher.weights, cfg.objective, cfg.objective_scale,
                matching_precision(cfg.precision, device, case.bn_mode == "train"),
                {n: m.unsqueeze(0) for n, m in masks.items()})
            ctx.state["exact_below"] = exact_threshold(matcher)
        return ctx

    def _optimizer(self, z: torch.Tensor) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.config
        if cfg.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([z], lr=cfg.lr)
        else:
            opt = torch.optim.SGD([z], lr=cfg.lr, momentum=0.9)
        n = cfg.iterations

        def factor(it: int) -> float:
            f = 1.0
            if cfg.warmup > 0 and it < cfg.warmup:
                f = (it + 1) / cfg.warmup
            if cfg.schedule == "step":
                f *= 0.1 ** sum(it >= m for m in (3 * n // 8, 5 * n // 8, 7 * n // 8))
            elif cfg.schedule == "cosine":
                f *= 0.5 * (1 + math.cos(math.pi * min(it, n) / n))
            return f

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, case: AttackCase, progress: Progress | None = None, stop: StopFlag | None = None,
            device: str | torch.device = "cpu") -> AttackResult:
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        t0 = time.perf_counter()
        ctx = self.prepare(case, device)
        kept: tuple[torch.Tensor, float, list[float], dict[str, torch.Tensor]] | None = None
        best_restart = 0
        done = 0
        interrupted = False
        for r in range(cfg.restarts):
            ctx.restart = r
            ctx.generator = torch.Generator().manual_seed(cfg.seed * 1000 + r)
            if ctx.state.get("factored_matcher") is not None:  # a new start is far from the optimum
                ctx.state["factored"] = ctx.state["factored_matcher"]
            outcome = self._optimise(ctx, progress, stop, done)
            done += outcome.iterations
            interrupted = outcome.interrupted
            if kept is not None and outcome.iterations == 0:
                break  # stopped before this restart took a step: its start is no candidate
            image, variants = self.select(ctx, outcome)
            loss = self.score(ctx, image)
            if kept is None or loss < kept[1]:
                kept, best_restart = (image, loss, outcome.history, variants), r
            if interrupted:
                break
        assert kept is not None
        diagnostics = {**self.diagnostics(ctx, best_restart), "best_restart": float(best_restart),
                       "labels_recovered": float(ctx.labels_recovered)}
        ctx.victim.record_bn_inputs(False)
        seconds = time.perf_counter() - t0
        image, final_loss, history, variants = kept
        diagnostics["seconds_per_iteration"] = seconds / max(done, 1)
        return AttackResult(images=self.returned(ctx, image), labels=ctx.labels.cpu(), loss_history=history,
                            iterations=done, seconds=seconds, final_loss=final_loss, interrupted=interrupted,
                            it_per_s=done / seconds if seconds > 0 else 0.0,
                            variants={k: self.returned(ctx, v) for k, v in variants.items()},
                            diagnostics=diagnostics)

    @staticmethod
    def returned(ctx: InversionContext, x: torch.Tensor) -> torch.Tensor:
        """Pixel images (C' channels) as a result holds them: clamped, the case's channels, CPU."""
        return ctx.victim.to_rgb(x.detach().clamp(0, 1)).cpu().contiguous()

    def _optimise(self, ctx: InversionContext, progress: Progress | None, stop: StopFlag | None,
                  offset: int) -> RestartOutcome:
        cfg = self.config
        victim = ctx.victim
        x0 = self.initial_images(ctx).detach()
        z = victim.pixels_to_param(x0).clone().requires_grad_(True)
        lo = victim.pixels_to_param(torch.zeros_like(x0[:1]))
        hi = victim.pixels_to_param(torch.ones_like(x0[:1]))
        opt, sched = self._optimizer(z)
        best_x = x0.clone()
        best_loss = math.inf
        history: list[float] = []
        for it in range(cfg.iterations):
            if stopped(stop):
                final = victim.param_to_pixels(z).detach().clone()
                return RestartOutcome(best_x, best_loss, final, math.inf, history, it, True)
            x = victim.param_to_pixels(z)
            loss = self.objective(ctx, x)
            (grad,) = torch.autograd.grad(loss, z)
            value = float(loss.detach())
            history.append(value)
            if value < best_loss:  # the loss belongs to the image before this step
                best_loss = value
                best_x = x.detach().clone()
            if cfg.signed:
                grad = grad.sign()
            scale = self.pixel_grad_scale(ctx, it, x.detach())
            if scale is not None:
                grad = grad * scale
            z.grad = grad
            opt.step()
            sched.step()
            with torch.no_grad():
                if cfg.box:
                    torch.maximum(z, lo, out=z)
                    torch.minimum(z, hi, out=z)
                new = self.on_iteration(ctx, it, victim.param_to_pixels(z), value)
                if new is not None:
                    z.copy_(victim.pixels_to_param(new.to(z.device)))
            report(progress, offset + it + 1, ctx.total_iterations, value)
        # Score the final iterate too.
        x = victim.param_to_pixels(z)
        final_value = float(self.objective(ctx, x).detach())
        final = x.detach().clone()
        if final_value < best_loss:
            best_loss, best_x = final_value, final
        return RestartOutcome(best_x, best_loss, final, final_value, history, cfg.iterations, False)
