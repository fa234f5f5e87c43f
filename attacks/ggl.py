"""GGL, Generative Gradient Leakage (Li et al. 2022): search the latent of a face generator.

Instead of pixels, GGL searches z of a pretrained generator G so that the update of G(z)
matches the observed one, with a gradient-free optimiser (CMA-ES, `cma` package), which also
copes with defenses that make the update non-differentiable: in its adaptive mode the trial
updates pass through the defense the attacker suspects (clipping with the bound estimated
from the observed norm, pruning at the observed zero fraction) before they are compared.

The generator is the DCGAN face generator (z in R^100 -> 64x64 RGB in [-1, 1]), resized to
the case's image size (and made grey for grey cases).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackResult, Progress, StopFlag, report, stopped
from attacks.case import AttackCase
from attacks.engine import VictimModel, layer_weights
from attacks.expanded import supports
from attacks.labels import case_labels
from attacks.registry import register_attack


@dataclass
class GGLConfig:
    """Defaults from the GGL paper: CMA-ES, 500 rounds x 50 samples, L2 gradient loss, the
    latent kept near the prior by a KL penalty of weight 0.1 (or bounded by tanh). DFLeak's
    comparison runs 200 rounds (`budget: 200`)."""

    budget: int = 500  # CMA-ES generations (rounds)
    population: int = 50  # samples per round
    sigma0: float = 1.0  # initial CMA-ES step size (the prior is N(0, I))
    objective: Literal["l2", "cosine"] = "l2"
    layer_weights: str | list[float] = "equal"
    latent_bound: Literal["kl", "tanh", "none"] = "kl"
    kl_weight: float = 0.1
    tanh_scale: float = 2.0  # latent_bound = tanh: z = tanh_scale * tanh(u)
    # none: naive; known (or true): the clients' configured defenses (case.defenses), each
    # modelled by its own transform (fl_sim.defenses); auto / clip / prune / clip+prune: a
    # defense the attacker only suspects, its parameters estimated from the observed update
    adaptive: Literal["none", "known", "auto", "clip", "prune", "clip+prune"] | bool = "none"
    chunk: int = 25  # candidates evaluated together (at most 10 through vmap); 0 = one by one
    fast: bool = True  # FedSGD without a suspected defense: factored distances (attacks.factored)
    label_rule: Literal["auto", "sign", "negative-bias", "count"] = "auto"
    seed: int = 0
    generator: nn.Module | None = None  # None: fl_sim.generator.load_face_generator()
    num_threads: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.adaptive, bool):  # as every gradient attack takes it: told the defenses
            self.adaptive = "known" if self.adaptive else "none"
        choices = {"objective": ("l2", "cosine"), "latent_bound": ("kl", "tanh", "none"),
                   "adaptive": ("none", "known", "auto", "clip", "prune", "clip+prune"),
                   "label_rule": ("auto", "sign", "negative-bias", "count")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} = {getattr(self, key)!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.budget < 1 or self.population < 2:
            raise ValueError("budget must be >= 1 and population >= 2")
        if self.sigma0 <= 0 or self.kl_weight < 0 or self.chunk < 0:
            raise ValueError("sigma0 must be > 0, kl_weight and chunk >= 0")


def latent_kl(z: torch.Tensor) -> torch.Tensor:
    """KL(N(mean z, var z) || N(0, 1)) per candidate over its latent entries (GGL's penalty).
    z: (P, D) -> (P,)"""
    mu = z.mean(dim=1)
    var = z.var(dim=1, unbiased=False)
    return -0.5 * (1 + torch.log(var + 1e-10) - mu.pow(2) - var)


@dataclass
class SuspectedDefense:
    """What the adaptive attacker applies to its trial updates."""

    clip_norm: float | None = None  # clip the whole update to this L2 norm
    prune_fraction: list[float] | None = None  # per tensor: share of entries zeroed
    known: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # the defenses' own model
    names: list[str] | None = None  # the update's tensor names, for `known`

    @property
    def active(self) -> bool:
        return self.clip_norm is not None or self.prune_fraction is not None or self.known is not None

    @classmethod
    def estimate(cls, targets: list[torch.Tensor], mode: str, case: AttackCase | None = None,
                 names: list[str] | None = None) -> "SuspectedDefense":
        if mode == "none":
            return cls()
        if mode == "known":
            from fl_sim.defenses import adaptive_model_of

            known = adaptive_model_of(case.defenses if case else [], dict(zip(names or [], targets)))
            return cls(known=known, names=names)
        norm = float(torch.sqrt(sum(t.pow(2).sum() for t in targets)))
        zeros = [float((t == 0).float().mean()) for t in targets]
        total_zero = sum(float((t == 0).sum()) for t in targets) / sum(t.numel() for t in targets)
        clip = mode in ("clip", "clip+prune", "auto")
        prune = mode in ("prune", "clip+prune") or (mode == "auto" and total_zero > 0.01)
        return cls(clip_norm=norm if clip else None, prune_fraction=zeros if prune else None)

    def apply(self, gs: list[torch.Tensor]) -> list[torch.Tensor]:
        """gs: per tensor (P, ...) trial updates of P candidates."""
        if self.known is not None:  # the defenses' models take one update: candidate by candidate
            names = self.names or []
            per = [self.known({n: g[p] for n, g in zip(names, gs)}) for p in range(gs[0].shape[0])]
            return [torch.stack([c[n] for c in per]) for n in names]
        if self.prune_fraction is not None:
            out = []
            for g, frac in zip(gs, self.prune_fraction):
                if frac <= 0:
                    out.append(g)
                    continue
                flat = g.reshape(g.shape[0], -1)
                k = int(round(frac * flat.shape[1]))
                if k <= 0:
                    out.append(g)
                    continue
                thresh = flat.abs().kthvalue(k, dim=1, keepdim=True).values
                out.append(torch.where(flat.abs() > thresh, flat, torch.zeros_like(flat)).view_as(g))
            gs = out
        if self.clip_norm is not None:
            norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in gs))
            factor = (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
            gs = [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in gs]
        return gs


@register_attack("ggl")
class GGL(Attack):
    Config = GGLConfig

    def _generator(self, device: torch.device) -> nn.Module:
        if self.config.generator is not None:
            return self.config.generator.to(device).eval()
        from fl_sim.generator import load_face_generator  # lazy: the asset is only needed here

        return load_face_generator(device)

    def images_from_latent(self, gen: nn.Module, z: torch.Tensor, case: AttackCase) -> torch.Tensor:
        """z (M, D) -> pixel images (M, C, H, W) in [0, 1] of the case's size."""
        x = (gen(z) + 1) / 2
        _, h, w = case.image_shape
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=h < x.shape[-2])
        if case.grey:
            x = x.mean(dim=1, keepdim=True).expand(-1, case.image_shape[0], -1, -1)
        return x.clamp(0, 1)

    def run(self, case: AttackCase, progress: Progress | None = None, stop: StopFlag | None = None,
            device: str | torch.device = "cpu") -> AttackResult:
        import cma

        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        t0 = time.perf_counter()
        device = torch.device(device)
        victim = VictimModel(case, device)
        labels, recovered = case_labels(case, victim.model, cfg.label_rule)
        labels = labels.to(device)
        targets = victim.targets()
        weights = torch.tensor(layer_weights(cfg.layer_weights, len(targets)), device=device)
        defense = SuspectedDefense.estimate(targets, cfg.adaptive, case, victim.names)
        gen = self._generator(device)
        latent_dim = int(getattr(gen, "latent_dim", 100))
        n = case.num_images
        params = victim.param_dict()

        fast = None
        if cfg.fast and not defense.active \
                and case.update_kind == "gradient" and supports(victim.model) is None:
            from attacks.factored import FactoredMatcher

            fast = FactoredMatcher(victim.model, case.bn_mode == "train", victim.names,
                                   [t.unsqueeze(0) for t in targets], weights.tolist(), cfg.objective)
            tt = sum(float(w) * float(t.pow(2).sum()) for w, t in zip(weights, targets))
            exact_below = 0.1 * tt if cfg.objective == "l2" else 1e-3

        def latents(u: np.ndarray) -> torch.Tensor:
            ut = torch.as_tensor(u, dtype=torch.float32, device=device)
            return cfg.tanh_scale * torch.tanh(ut) if cfg.latent_bound == "tanh" else ut

        def losses_of(imgs: torch.Tensor, z: torch.Tensor, exact: bool = False) -> torch.Tensor:
            """The objective of P candidates: images (P, n, C, H, W) as returned, latents (P, n * D)."""
            inp = victim.normalise(imgs.flatten(0, 1)).reshape(imgs.shape)
            losses = []
            step = cfg.chunk if cfg.chunk > 0 else 1
            for s in range(0, len(imgs), step):
                batch = inp[s:s + step]
                if fast is not None and not exact:  # values only, no parameter gradients formed
                    loss = fast(batch, labels.unsqueeze(0).expand(len(batch), -1), create_graph=False).detach()
                    if bool((loss >= exact_below).all()):
                        losses.append(loss)
                        continue
                sub = max(1, min(step, 10))  # vmap holds one model-sized gradient per candidate
                for j in range(0, len(batch), sub):
                    part = batch[j:j + sub]
                    if cfg.chunk > 0:
                        gs = torch.func.vmap(lambda i: victim.functional_update(params, i, labels))(part)
                    else:
                        gs = [g.unsqueeze(0) for g in victim.functional_update(params, part[0], labels)]
                    gs = defense.apply([g.detach() for g in gs])
                    losses.append(self._distance(gs, targets, weights))
            loss = torch.cat(losses)
            if cfg.latent_bound == "kl" and cfg.kl_weight > 0:
                loss = loss + cfg.kl_weight * latent_kl(z)
            return loss.double().cpu()

        def candidate_losses(u: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
            """Losses of P candidates (P, n * latent_dim) and their images."""
            z = latents(u)
            with torch.no_grad():
                imgs = self.images_from_latent(gen, z.reshape(-1, latent_dim), case)
            imgs = imgs.reshape(len(u), n, *imgs.shape[1:])
            return losses_of(imgs, z).numpy(), imgs

        dim = n * latent_dim
        es = cma.CMAEvolutionStrategy(np.zeros(dim), cfg.sigma0,
                                      {"popsize": cfg.population, "seed": cfg.seed + 1, "verbose": -9,
                                       "maxiter": cfg.budget})
        best_loss = math.inf
        best_images: torch.Tensor | None = None
        best_u = np.zeros(dim)  # stopped before the first round: the prior's mean
        history: list[float] = []
        rounds = 0
        interrupted = False
        for r in range(cfg.budget):
            if stopped(stop):
                interrupted = True
                break
            cands = es.ask()
            losses, imgs = candidate_losses(np.asarray(cands))
            es.tell(cands, losses.tolist())
            i = int(np.argmin(losses))
            if losses[i] < best_loss:
                best_loss, best_images, best_u = float(losses[i]), imgs[i].detach().clone(), np.asarray(cands[i])
            history.append(best_loss)
            rounds = r + 1
            report(progress, rounds, cfg.budget, best_loss)
        if best_images is None:
            _, imgs = candidate_losses(best_u[None])
            best_images = imgs[0]
        # The objective of the image returned, without the factored speed path's rounding.
        final_loss = float(losses_of(best_images.unsqueeze(0), latents(best_u[None]), exact=True)[0])
        seconds = time.perf_counter() - t0
        diagnostics = {"labels_recovered": float(recovered), "evaluations": float(rounds * cfg.population),
                       "clip_norm": float(defense.clip_norm or 0.0),
                       "prune_fraction": float(np.mean(defense.prune_fraction)) if defense.prune_fraction else 0.0}
        return AttackResult(images=best_images.cpu(), labels=labels.cpu(), loss_history=history,
                            iterations=rounds, seconds=seconds, final_loss=final_loss, interrupted=interrupted,
                            it_per_s=rounds / seconds if seconds > 0 else 0.0, diagnostics=diagnostics)

    def _distance(self, gs: list[torch.Tensor], targets: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Per-candidate gradient distance; gs[l] is (P, *targets[l].shape)."""
        p = gs[0].shape[0]
        if self.config.objective == "l2":
            return sum(w * (g.reshape(p, -1) - t.reshape(1, -1)).pow(2).sum(1)
                       for w, g, t in zip(weights, gs, targets))
        dot = sum(w * (g.reshape(p, -1) @ t.reshape(-1)) for w, g, t in zip(weights, gs, targets))
        ng = torch.sqrt(sum(w * g.reshape(p, -1).pow(2).sum(1) for w, g in zip(weights, gs)))
        nt = torch.sqrt(sum(w * t.pow(2).sum() for w, t in zip(weights, targets)))
        return 1 - dot / (ng * nt).clamp_min(1e-30)


def latent_dim_of(gen: nn.Module) -> int:
    return int(getattr(gen, "latent_dim", 100))


__all__: list[Any] = ["GGL", "GGLConfig", "SuspectedDefense", "latent_kl"]
