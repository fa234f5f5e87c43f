"""Client-side defenses: pure transforms of a client's data and update, applied in order.

A defense may transform the client's training images (`on_data`: mixing, perturbing) and
its update (`on_update`: clipping, noise, pruning). The update a defense sees and returns
is keyed by parameter name, in `named_parameters()` order: the FedSGD gradient or the
FedAvg weight difference w_k - w_t.

They live in the foundation, not in `clients/`, because they are one set of transforms that
the ClientApp applies and that an adaptive attack (which must not import the client) reuses
to model exactly what clients do. Each defense has a typed `Config`; a config's
`defenses: [{name, params}]` builds them through the registry with one-line errors.

Flower's `LocalDpMod` and clipping mods are not used for `gaussian` and `clip`: they read and
write the legacy FitIns / FitRes layout (not this project's typed messages), clip the whole
weight vector including BatchNorm statistics, have no FedSGD form (a gradient is not a weight
difference), and an adaptive attack needs the very same transform as a pure function of the
update. Flower's server-side DP wrapper and SecAgg+ are used as they are (server/strategy.py,
server/secure_aggregation.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import torch
from torch import nn

from fl_sim.ats import HYBRID, parse_policy, transform_batch
from fl_sim.config import DefenseConfig
from fl_sim.registry import Registry, build_settings


@dataclass
class DefenseContext:
    """What a defense may know about the client's step."""

    algorithm: Literal["fedsgd", "fedavg"]
    server_round: int
    partition_id: int
    seed: int
    local_lr: float
    generator: torch.Generator  # seeded per (seed, round, client): defenses are reproducible
    # The client's model (at the weights its update was computed from: the global model in
    # FedSGD, the trained local model in FedAvg) and the normalised inputs it trained on, for
    # defenses that look at the representation (Soteria). None where there is no model.
    model: nn.Module | None = None
    inputs: torch.Tensor | None = None
    # All the client's own images in [0, 1] and their labels (not only this round's sample),
    # for defenses that mix (MixUp, InstaHide), and the number of classes for soft labels.
    pool_images: torch.Tensor | None = None
    pool_labels: torch.Tensor | None = None
    num_classes: int = 0


@dataclass
class NoSettings:
    pass


class Defense:
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoSettings

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def on_data(self, images: torch.Tensor, labels: torch.Tensor,
                ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (N, C, H, W) and labels; returns what the client trains on."""
        return images, labels

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        """The update by parameter name; returns the update the client sends."""
        return update

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel | None:
        """The attacker's model of this defense, for an adaptive attack: a differentiable
        function of a trial update (straight-through where the defense is not) doing what the
        defense did, its unknown parameters estimated from the `observed` (defended) update.
        None when there is nothing to model (random noise cannot be undone)."""
        return None

    def privacy(self, rounds: int, expected: int) -> str | None:
        """What the defense guarantees a client over `rounds` (and at `expected` participations),
        for the report; None when it makes no formal privacy claim."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


UpdateModel: TypeAlias = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

DEFENSES: Registry[type[Defense]] = Registry("defense")
register_defense = DEFENSES.register


# ---------------------------------------------------------------------------------------
# The defenses


@dataclass
class ClipConfig:
    max_norm: float = 1.0  # bound on the L2 norm of the whole update (all parameters together)

    def __post_init__(self) -> None:
        if self.max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {self.max_norm}")


@register_defense("clip")
class ClipUpdate(Defense):
    """Scale the update so its global L2 norm is at most `max_norm` (the clipping step of
    DP-SGD / DP-FedAvg, applied once to the client's whole update)."""

    Config = ClipConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in update.values()]))
        scale = min(1.0, self.config.max_norm / max(float(norm), 1e-12))
        return {k: v * scale for k, v in update.items()}

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel | None:
        return _clip_to(self.config.max_norm, observed)


def _norm(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(v.float().pow(2).sum() for v in update.values()))


def _scale_onto(bound: float) -> UpdateModel:
    """Scale a trial update to norm exactly `bound`, differentiably (only its direction is
    then matched)."""

    def model(trial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = bound / _norm(trial).clamp_min(1e-12)
        return {k: v * scale for k, v in trial.items()}

    return model


def _clip_to(bound: float, observed: dict[str, torch.Tensor]) -> UpdateModel | None:
    """The clipping the observed update went through, on a trial update. An observed norm at
    the bound means the client's update was longer and was scaled onto it: the trial is
    scaled onto the bound too. An observed norm below the bound means clipping did nothing:
    None."""
    if float(_norm(observed)) < bound * (1 - 1e-4):
        return None
    return _scale_onto(bound)


@dataclass(frozen=True)
class ZeroPattern:
    """The model of a defense that only zeroes entries (pruning, Soteria): the trial is zeroed
    wherever the observed update is exactly zero. A named type rather than a closure because
    the factored matching (attacks.factored) can apply it without forming the gradients."""

    masks: dict[str, torch.Tensor]  # parameter name -> 1 where the observed update is non-zero

    def __call__(self, trial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v * self.masks[k].to(v.device, v.dtype) if k in self.masks else v for k, v in trial.items()}

    def then(self, other: "ZeroPattern") -> "ZeroPattern":
        """Both patterns applied (one after the other is one mask, the product)."""
        masks = dict(self.masks)
        for k, m in other.masks.items():
            masks[k] = masks[k] * m if k in masks else m
        return ZeroPattern(masks)


def _zero_pattern(observed: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> ZeroPattern:
    """Zero the trial wherever the observed update is exactly zero (in `names`, or all)."""
    return ZeroPattern({k: (v != 0).to(v.dtype) for k, v in observed.items() if names is None or k in names})


def _flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().float().flatten() for v in update.values()])


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = flat[i:i + v.numel()].view_as(v).to(v.dtype)
        i += v.numel()
    return out


@dataclass
class PruneConfig:
    rate: float = 0.9  # the fraction of the update's entries set to zero (the smallest in magnitude)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")


@register_defense("prune")
class PruneUpdate(Defense):
    """Magnitude pruning (gradient sparsification; Zhu et al.'s defense against DLG): keep the
    largest (1 - rate) of the entries of the whole update, zero the rest. Exactly
    round(rate * n) entries are zeroed (ties broken by position), so the rate is what is sent."""

    Config = PruneConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        flat = _flat(update)
        drop = round(self.config.rate * flat.numel())
        if drop == 0:
            return update
        keep = torch.topk(flat.abs(), flat.numel() - drop, sorted=False).indices
        pruned = torch.zeros_like(flat)
        pruned[keep] = flat[keep]
        return _unflat(pruned, update)

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel:
        # the kept positions are the observed non-zeros: match the trial only there
        return _zero_pattern(observed)


@dataclass
class QuantizeConfig:
    bits: int = 4  # 2**bits levels per parameter tensor, evenly spaced from its min to its max
    stochastic: bool = True  # unbiased stochastic rounding (QSGD-style); False: to the nearest level

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in [1, 16], got {self.bits}")


@register_defense("quantize")
class QuantizeUpdate(Defense):
    """Uniform k-bit quantisation of each parameter tensor of the update onto the grid
    min + j * (max - min) / (2**bits - 1), j = 0 .. 2**bits - 1. Stochastic rounding rounds up
    with probability equal to the fractional part (drawn from the client's seeded generator),
    so the quantised update is unbiased: E[q] = the update."""

    Config = QuantizeConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        levels = 2 ** self.config.bits - 1
        out = {}
        for k, v in update.items():
            x = v.detach().float()
            lo, hi = x.min(), x.max()
            step = (hi - lo) / levels
            if float(step) == 0.0:  # a constant tensor is on its own grid
                out[k] = v
                continue
            position = (x - lo) / step
            if self.config.stochastic:
                noise = torch.rand(position.shape, generator=ctx.generator)
                index = torch.floor(position + noise)
            else:
                index = torch.round(position)
            out[k] = (lo + index.clamp(0, levels) * step).to(v.dtype)
        return out

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel:
        """Each tensor's grid from the observed values (its min and max are the grid's ends).
        Stochastic rounding is unbiased, so its model is clamping to the grid's range;
        rounding to the nearest level is modelled straight-through (the forward pass rounds,
        the backward pass sees the identity)."""
        levels = 2 ** self.config.bits - 1
        grids = {k: (float(v.min()), float(v.max())) for k, v in observed.items()}
        stochastic = self.config.stochastic

        def model(trial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in trial.items():
                lo, hi = grids[k]
                clamped = v.clamp(lo, hi)
                if stochastic or hi == lo:
                    out[k] = clamped
                    continue
                step = (hi - lo) / levels
                rounded = lo + torch.round((clamped - lo) / step) * step
                out[k] = clamped + (rounded - clamped).detach()
            return out

        return model


@dataclass
class GaussianConfig:
    max_norm: float = 1.0  # the clip bound C: the update's L2 norm is clipped to it first
    noise_multiplier: float = 1.0  # z: noise N(0, (z C)^2) on every entry
    delta: float = 1e-5  # the delta of the (epsilon, delta) the accountant reports

    def __post_init__(self) -> None:
        if self.max_norm <= 0 or self.noise_multiplier <= 0:
            raise ValueError(f"max_norm and noise_multiplier must be > 0, got {self.max_norm}, {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


@register_defense("gaussian")
class GaussianUpdate(Defense):
    """Local differential privacy by the Gaussian mechanism: clip the update's L2 norm to C,
    then add N(0, (z C)^2) to every entry (drawn from the client's seeded generator). The
    privacy it buys is `epsilon(participations)`."""

    Config = GaussianConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        clipped = ClipUpdate(ClipConfig(self.config.max_norm)).on_update(update, ctx)
        std = self.config.noise_multiplier * self.config.max_norm
        return {k: v + std * torch.randn(v.shape, generator=ctx.generator).to(v.dtype) for k, v in clipped.items()}

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel | None:
        # the noise cannot be modelled, and it hides whether clipping acted: assume it did
        # (a long update is the common case); the trial is scaled onto the public bound
        return _scale_onto(self.config.max_norm)

    def epsilon(self, participations: int) -> float:
        """The client's epsilon (at the configured delta) after sending `participations`
        noised updates, by Opacus's RDP accountant. Sampling rate 1: the server picks the
        clients and knows whose update it holds, so subsampling amplifies nothing against it."""
        from opacus.accountants import RDPAccountant

        if participations < 1:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.config.noise_multiplier, 1.0, participations)]
        return float(accountant.get_epsilon(self.config.delta))

    def privacy(self, rounds: int, expected: int) -> str:
        return (f"{self.name} (z = {self.config.noise_multiplier:g}, C = {self.config.max_norm:g}): epsilon "
                f"{self.epsilon(rounds):.3g} at delta {self.config.delta:g} for a client in all {rounds} rounds, "
                f"{self.epsilon(expected):.3g} for {expected} (the expected participations)")


@dataclass
class NoiseConfig:
    std: float = 0.01  # the standard deviation of the noise added to every entry of the update

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")


@register_defense("noise")
class NoiseUpdate(Defense):
    """Additive Gaussian noise N(0, std^2) on every entry of the update, without clipping
    (the noise defense of Zhu et al.'s DLG paper, swept over std 1e-4 .. 1e-1). It makes no
    formal privacy claim: the update's norm is unbounded; `gaussian` is the DP version."""

    Config = NoiseConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        std = self.config.std
        return {k: v + std * torch.randn(v.shape, generator=ctx.generator).to(v.dtype) for k, v in update.items()}


@dataclass
class SoteriaConfig:
    rate: float = 0.8  # the fraction of the representation's features whose FC-weight update is zeroed
    probes: int = 0  # 0: the exact Jacobian; k > 0: estimate its row norms from k random JVPs (faster)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")
        if self.probes < 0:
            raise ValueError(f"probes must be >= 0, got {self.probes}")


# Soteria's probes: the step of the central difference, in the units of the normalised inputs
# (about unit variance). float32 keeps about 4 significant digits of (Jv) at this step.
_PROBE_STEP = 1e-3


@register_defense("soteria")
class Soteria(Defense):
    """Soteria (Sun et al., CVPR 2021): perturb the representation r that feeds the classifier
    layer. Feature f's leakage score is ||dr_f/dx|| / |r_f| summed over the client's images (how
    little the input must move to change it); the features with the lowest scores, a `rate`
    share of them, are the ones that reveal the input most, and their columns of the
    classifier layer's weight update are zeroed (the released code's masking of the FC
    gradient). Every other parameter's update is sent unchanged.

    Exact scores need one backward pass per feature and image (512 for ResNet18); with
    `probes: k` the row norms come from k Jacobian-vector products (central differences) with Gaussian
    probes (E[(J v)_f^2] = ||dr_f/dx||^2), which is what a federation of FedAvg clients can
    afford. The scores are computed at `ctx.model` on `ctx.inputs`, BatchNorm on its running
    statistics."""

    Config = SoteriaConfig

    def on_update(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        if ctx.model is None or ctx.inputs is None:
            raise ValueError("soteria needs the client's model and inputs (DefenseContext.model, .inputs)")
        if self.config.rate == 0.0:
            return update
        from fl_sim.models import last_linear

        fc = last_linear(ctx.model)
        name = next(n for n, p in ctx.model.named_parameters() if p is fc.weight)
        scores = self.scores(ctx.model, ctx.inputs, ctx.generator)
        drop = round(self.config.rate * len(scores))
        masked = torch.argsort(scores, stable=True)[:drop]  # the lowest scores leak the most
        out = dict(update)
        weight = update[name].clone()
        weight[:, masked] = 0
        out[name] = weight
        return out

    def adaptive(self, observed: dict[str, torch.Tensor]) -> UpdateModel:
        # the masked features are the classifier weight's all-zero columns; zero them in the
        # trial too (the observed zeros of that one tensor)
        weights = [k for k, v in observed.items() if v.dim() == 2]
        return _zero_pattern(observed, weights[-1:])

    def scores(self, model: nn.Module, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """||dr_f/dx|| / |r_f| per feature f, summed over the images."""
        from fl_sim.models import last_linear

        fc = last_linear(model)
        was_training = model.training
        model.eval()
        captured: list[torch.Tensor] = []
        hook = fc.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            if self.config.probes == 0:
                norms, r = self._exact(model, inputs, captured)
            else:
                norms, r = self._estimated(model, inputs, captured, generator)
        finally:
            hook.remove()
            model.train(was_training)
        return (norms / r.abs().clamp_min(1e-12)).sum(0)

    @staticmethod
    def _exact(model, inputs, captured):
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            model(x)
            r = captured[-1]
            n, features = r.shape
            norms = torch.empty(n, features)
            for f in range(features):  # one backward per feature: row f of each image's Jacobian
                (g,) = torch.autograd.grad(r[:, f].sum(), x, retain_graph=f < features - 1)
                norms[:, f] = torch.linalg.vector_norm(g.flatten(1), dim=1)
        return norms, r.detach()

    def _estimated(self, model, inputs, captured, generator):
        # Central differences of r along k Gaussian probes v: (r(x + hv) - r(x - hv)) / 2h = Jv.
        # Plain forward passes rather than forward-mode AD: its dual levels are process-wide,
        # so clients in threads of one process (the in-process grid's workers) had to take
        # turns, and a FedAvg round under Soteria ran on one core. In eval mode a ReLU network
        # is piecewise linear in x, so the difference is the JVP itself wherever no unit
        # switches within the step (and within O(h^2) of it for smooth activations).
        k, n = self.config.probes, len(inputs)
        x = inputs.detach()
        v = torch.randn((k * n, *x.shape[1:]), generator=generator).to(x.dtype)
        tiled = x.repeat(k, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            model(x)
            model(tiled + _PROBE_STEP * v)
            model(tiled - _PROBE_STEP * v)
        r, up, down = captured[-3:]
        jv = (up - down) / (2 * _PROBE_STEP)
        norms = jv.view(k, n, -1).pow(2).mean(0).sqrt()
        return norms, r


@dataclass
class MixConfig:
    k: int = 4  # images mixed into each training image, itself included
    alpha: float = 1.0  # Dirichlet concentration of the k mixing weights (1: uniform on the simplex)
    sign_flip: bool = False  # flip each pixel's sign (about grey 0.5) at random: InstaHide's mask

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@register_defense("mixup")
class MixUp(Defense):
    """Train on mixtures (Zhang et al.'s MixUp, as a privacy defense): each image of the
    client's sample becomes a convex combination of itself and k - 1 images drawn from the
    client's own data, weights from Dirichlet(alpha), and its label the same combination of
    one-hot labels (soft labels: the client no longer sends hard labels). The truth the
    metrics compare against stays the client's real images: what leaks of them is measured."""

    Config = MixConfig

    def on_data(self, images: torch.Tensor, labels: torch.Tensor,
                ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.pool_images is None or ctx.pool_labels is None or ctx.num_classes < 1:
            raise ValueError(f"{self.name} needs the client's own images (DefenseContext.pool_images, .pool_labels, "
                             ".num_classes)")
        k, n, g = self.config.k, len(images), ctx.generator
        others = torch.randint(len(ctx.pool_images), (n, k - 1), generator=g)
        members = torch.cat([images[:, None], ctx.pool_images[others]], dim=1)  # (n, k, C, H, W)
        hard = labels if labels.dim() == 1 else labels.argmax(1)
        member_labels = torch.cat([hard[:, None], ctx.pool_labels[others]], dim=1)  # (n, k)
        # Dirichlet weights from the client's seeded generator (torch's Dirichlet takes none)
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        weights = torch.from_numpy(rng.dirichlet([self.config.alpha] * k, size=n)).float()
        mixed = (weights[:, :, None, None, None] * members).sum(1)
        soft = torch.zeros(n, ctx.num_classes).scatter_add_(1, member_labels, weights)
        if self.config.sign_flip:
            signs = torch.randint(0, 2, mixed.shape, generator=g).to(mixed.dtype) * 2 - 1
            mixed = 0.5 + signs * (mixed - 0.5)
        return mixed.to(images.dtype), soft


@dataclass
class InstaHideConfig(MixConfig):
    sign_flip: bool = True


@register_defense("instahide")
class InstaHide(MixUp):
    """InstaHide (Huang et al., 2020), its inside-data variant: MixUp of k of the client's
    own images followed by a random pixel-wise sign flip (about grey 0.5, i.e. of the pixel
    in [-1, 1]), a new mask for every image and round."""

    Config = InstaHideConfig


@dataclass
class ATSConfig:
    policy: str = HYBRID  # the paper's searched hybrid, 3-1-7+43-18-18
    crop_flip: bool = True  # the authors' random crop (padding 1/8) and flip before the policy

    def __post_init__(self) -> None:
        parse_policy(self.policy)


@register_defense("ats")
class ATSAugmentation(Defense):
    """Train on images transformed by an ATS augmentation policy (Gao et al., CVPR 2021): one
    chain of the policy per image, at random; the operations are `fl_sim.ats`'s. No adaptive
    model: the transform is drawn anew for every image."""

    Config = ATSConfig

    def on_data(self, images: torch.Tensor, labels: torch.Tensor,
                ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
        return transform_batch(images, self.config.policy, self.config.crop_flip, ctx.generator), labels


# ---------------------------------------------------------------------------------------


def build_defenses(configs: Sequence[DefenseConfig]) -> list[Defense]:
    """The configured defenses, in order. An unknown name or a bad setting is a ValueError of
    one line naming `defenses.i...` and what is allowed."""
    out = []
    for i, cfg in enumerate(configs):
        try:
            cls = DEFENSES.get(cfg.name)
        except ValueError as exc:
            raise ValueError(f"defenses.{i}.name: {exc}") from None
        out.append(cls(build_settings(cls.Config, cfg.params, f"defenses.{i}.params")))
    return out


def privacy_statement(defenses: Sequence[Defense], rounds: int, sampled_fraction: float) -> str | None:
    """One line on what the configured defenses guarantee a client over a run of `rounds`: if
    sampled in every round (the worst case) and at the expected number of participations.
    None when no defense makes a formal privacy claim."""
    expected = max(1, round(rounds * sampled_fraction))
    return "; ".join(p for d in defenses if (p := d.privacy(rounds, expected))) or None


def central_epsilon(config) -> float | None:
    """The released model's epsilon (at federation.central_dp.delta) after all rounds of
    central DP, by Opacus's RDP accountant with sampling rate clients_per_round / num_clients:
    against those who see only the model, a client hides among each round's sample. None
    without central DP or noise."""
    dp = config.federation.central_dp
    if dp is None or dp.noise_multiplier <= 0:
        return None
    from opacus.accountants import RDPAccountant

    fed = config.federation
    accountant = RDPAccountant()
    accountant.history = [(dp.noise_multiplier, fed.clients_per_round / fed.num_clients, fed.rounds)]
    return float(accountant.get_epsilon(dp.delta))


def apply_on_data(defenses: Sequence[Defense], images: torch.Tensor, labels: torch.Tensor,
                  ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor]:
    for d in defenses:
        images, labels = d.on_data(images, labels, ctx)
    return images, labels


def adaptive_model(defenses: Sequence[Defense], observed: dict[str, torch.Tensor]) -> UpdateModel | None:
    """The attacker's model of the clients' defenses, in their order (those it can model);
    None when none can be modelled."""
    models = [m for d in defenses if (m := d.adaptive(observed)) is not None]
    if not models:
        return None
    if all(isinstance(m, ZeroPattern) for m in models):  # kept recognisable for the factored matching
        pattern = models[0]
        for m in models[1:]:
            pattern = pattern.then(m)
        return pattern

    def model(trial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for m in models:
            trial = m(trial)
        return trial

    return model


def adaptive_model_of(configs: Sequence[dict[str, Any]], observed: dict[str, torch.Tensor]) -> UpdateModel | None:
    """`adaptive_model` of defenses given as configured ({name, params}, as an attack case
    carries them)."""
    return adaptive_model(build_defenses([DefenseConfig(**c) for c in configs]), observed)


def apply_on_update(defenses: Sequence[Defense], update: dict[str, torch.Tensor],
                    ctx: DefenseContext) -> dict[str, torch.Tensor]:
    for d in defenses:
        update = d.on_update(update, ctx)
    return update


__all__ = ["Defense", "DefenseContext", "DEFENSES", "register_defense", "build_defenses",
           "apply_on_data", "apply_on_update", "adaptive_model", "adaptive_model_of", "UpdateModel", "ZeroPattern", "privacy_statement", "central_epsilon", "ClipUpdate", "PruneUpdate", "QuantizeUpdate", "GaussianUpdate",
           "NoiseUpdate", "Soteria", "MixUp", "InstaHide"]
