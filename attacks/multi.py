"""Attack several victims of one round together.

One victim at batch 1 leaves a CPU mostly idle: batch-1 convolutions run on slow kernels and
every iteration streams the whole model's parameter-sized tensors several times. Victims of
the same round share the global weights, so their iterations can run as one: torch.func.vmap
over victims of the per-victim update (each victim keeps its own BatchNorm batch statistics,
labels and observed update), one fused matching loss for all, one Adam over all images (Adam
is elementwise, so this is the same as one Adam per victim).

Per-victim results are the same as attacking each alone (up to float rounding); a test checks it.
Each victim's restart is then finished as `GradientInversion.run` finishes one: the attack's
`select` picks the returned image, `score` evaluates it alone (exact matching, clamped), and
that value is the victim's `final_loss` and decides which restart it keeps.
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Sequence

import torch

from attacks.base import AttackResult, Progress, StopFlag, report, stopped
from attacks.case import AttackCase
from attacks.expanded import ExpandedModel, supports
from attacks.engine import (_EXACT_BELOW, GradientInversion, InversionContext, RestartOutcome, exact_threshold,
                            layer_weights, matching_precision, factored_masks)
from attacks.factored import FactoredMatcher

_SAME = ("model_name", "num_classes", "image_shape", "update_kind", "num_images", "local_lr", "local_steps",
         "local_batch_size", "mean", "std", "grey", "bn_mode")


def compatible(cases: Sequence[AttackCase]) -> str | None:
    """None when the cases can be attacked together, else the reason they cannot."""
    first = cases[0]
    for c in cases[1:]:
        for key in _SAME:
            if getattr(c, key) != getattr(first, key):
                return f"cases differ in {key}"
        if c.update.keys() != first.update.keys():
            return "cases update different parameters"
        if c.weights is not first.weights:
            for k, v in first.weights.items():
                if not torch.equal(v, c.weights[k]):
                    return f"cases hold different global weights ({k})"
    return None


def compatible_groups(cases: Sequence[AttackCase]) -> list[list[int]]:
    """The cases' indices split into groups that can be attacked together, in order of first
    appearance. FedAvg clients hold different numbers of images (ORL by identity: 3, 4 or 5),
    and one odd case must not send the others one by one (MobileNetV2, 3 images, 2 local
    steps: 180-230 s per victim alone, 51-75 s in a batch of 2). Compatibility is equality of
    shapes, settings and weights, so comparing with each group's first case is enough."""
    groups: list[list[int]] = []
    for i, case in enumerate(cases):
        home = next((g for g in groups if compatible([cases[g[0]], case]) is None), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def _stacked_masks(masks: list[dict[str, torch.Tensor]], targets: list[torch.Tensor],
                   names: list[str]) -> dict[str, torch.Tensor]:
    """Each victim's zero-pattern masks stacked per parameter (V, ...); a victim without a mask
    for a parameter matches it everywhere (ones)."""
    out = {}
    for name, target in zip(names, targets):
        if any(name in m for m in masks):
            out[name] = torch.stack([m[name].to(target.dtype) if name in m else torch.ones_like(target[0])
                                     for m in masks])
    return out


def _vshape(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)).double()


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-victim dot products of (V, ...) tensors: BLAS dots, no elementwise temporary (a
    batched bmm of this shape is several times slower on the CPU)."""
    return torch.stack([_dot(a[i], b[i]) for i in range(a.shape[0])])


class _MatchingMany(torch.autograd.Function):
    """The fused matching loss of attacks.engine for V victims at once: returns (V,) losses."""

    @staticmethod
    def forward(ctx, kind: str, weights: list[float], targets: list[torch.Tensor], tt: torch.Tensor,
                *gs: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(weights, dtype=torch.float64, device=gs[0].device).view(-1, 1)  # (L, 1)
        v = gs[0].shape[0]
        gg = torch.stack([_vdot(g, g) for g in gs])  # (L, V)
        gt = torch.stack([_vdot(g, t) for g, t in zip(gs, targets)])
        if kind == "l2":
            dd = gg - 2 * gt + tt
            near = ((w * dd).sum(0) < _EXACT_BELOW * (w * (gg + tt)).sum(0)).tolist()
            for i in (i for i in range(v) if near[i]):
                dd[:, i] = torch.stack([_dot(g[i] - t[i], g[i] - t[i]) for g, t in zip(gs, targets)])
            loss = (w * dd).sum(0)
            coef_t = (-2 * w).expand(-1, v)
            coef_g = (2 * w).expand(-1, v)
        elif kind == "cosine":
            ng = (w * gg).sum(0).clamp_min(1e-30).sqrt()  # (V,)
            nt = (w * tt).sum(0).clamp_min(1e-30).sqrt()
            loss = 1 - (w * gt).sum(0) / (ng * nt)
            ratio = (ng / nt).tolist()
            for i in (i for i in range(v) if float(loss[i]) < _EXACT_BELOW):
                dd = torch.stack([_dot(d, d) for d in (torch.sub(g[i], t[i], alpha=ratio[i])
                                                       for g, t in zip(gs, targets))])
                loss[i] = 0.5 * (w[:, 0] * dd).sum() / (ng[i] * ng[i])
            cos = 1 - loss
            coef_t = -w / (ng * nt)
            coef_g = w * cos / (ng * ng)
        else:  # cosine-layer
            ng = gg.clamp_min(1e-30).sqrt()  # (L, V)
            nt = tt.clamp_min(1e-30).sqrt()
            per_layer = 1 - gt / (ng * nt)
            ratio = (ng / nt).tolist()
            for l, i in (per_layer < _EXACT_BELOW).nonzero().tolist():
                d = torch.sub(gs[l][i], targets[l][i], alpha=ratio[l][i])
                per_layer[l, i] = 0.5 * _dot(d, d) / (ng[l, i] * ng[l, i])
            loss = (w * per_layer).sum(0) / w.sum()
            coef_t = -w / (ng * nt) / w.sum()
            coef_g = w * (1 - per_layer) / (ng * ng) / w.sum()
        ctx.coefs = (coef_t, coef_g)
        ctx.targets = targets
        ctx.save_for_backward(*gs)
        return loss.to(gs[0].dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gs = ctx.saved_tensors
        coef_t, coef_g = ctx.coefs
        go = grad_out.double().view(1, -1)
        a_all, b_all = coef_t * go, coef_g * go  # (L, V)
        out = [torch.mul(t, _vshape(a, t)).addcmul_(g, _vshape(b, g))
               for g, t, a, b in zip(gs, ctx.targets, a_all, b_all)]
        return (None, None, None, None, *out)


class MultiVictimInversion:
    """Run one GradientInversion attack on several compatible cases at once.

    backend: "factored" (attacks.factored: FedSGD matching without parameter gradients, the
    fastest; near an optimum it hands over to an exact backend), "expanded" (attacks.expanded:
    per-victim layers as batched GEMMs), "vmap" (torch.func.vmap of the per-victim update), or
    "auto" (factored for FedSGD cases of supported models, else expanded, else vmap).
    """

    def __init__(self, attack: GradientInversion, backend: str = "auto") -> None:
        cfg = attack.config
        if cfg.bn_stats > 0:
            raise ValueError("the BatchNorm-statistics prior is not supported when attacking victims together")
        if backend not in ("auto", "factored", "expanded", "vmap"):
            raise ValueError(f"backend must be auto, factored, expanded or vmap, got {backend!r}")
        self.attack = attack
        self.backend = backend

    def run(self, cases: Sequence[AttackCase], progress: Progress | None = None, stop: StopFlag | None = None,
            device: str | torch.device = "cpu") -> list[AttackResult]:
        why = compatible(cases)
        if why:
            raise ValueError(f"cannot attack these victims together: {why}")
        attack, cfg = self.attack, self.attack.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        t0 = time.perf_counter()
        params_of_prepare = inspect.signature(attack.prepare).parameters
        if "victim" in params_of_prepare and "fast" in params_of_prepare:
            first = attack.prepare(cases[0], device, fast=False)
            victim = first.victim  # one model for all: the weights are the same
            ctxs = [first] + [attack.prepare(c, device, victim=victim, fast=False) for c in cases[1:]]
        else:  # a subclass with its own prepare(case, device): one model each, then share one
            ctxs = [attack.prepare(c, device) for c in cases]
            victim = ctxs[0].victim
            for ctx in ctxs:
                ctx.state["factored"] = None
        v = len(cases)
        labels = torch.stack([ctx.labels for ctx in ctxs])  # (V, N)
        targets = [torch.stack(ts).contiguous() for ts in zip(*[ctx.matcher.targets for ctx in ctxs])]
        tt = torch.tensor([ctx.matcher.tt for ctx in ctxs], dtype=torch.float64).T.contiguous()  # (L, V)
        weights = layer_weights(cfg.layer_weights, len(targets))
        params = victim.param_dict()
        c0 = cases[0]
        exact_backend = self.backend if self.backend in ("expanded", "vmap") else (
            "expanded" if supports(victim.model) is None else "vmap")
        if exact_backend == "expanded":
            expanded = ExpandedModel(victim.model, c0.bn_mode == "train")

            def update(inp: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
                return expanded.update(params, victim.names, inp, y, c0.update_kind, c0.local_lr, c0.local_steps,
                                       c0.local_batch_size)
        else:
            update = torch.func.vmap(lambda inp, y: victim.functional_update(params, inp, y))
        # An adaptive attack passes each victim's trial gradients through its own model of the
        # defense (fitted to that victim's observed update) before matching.
        defended = [ctx.state.get("defense_model") for ctx in ctxs]
        adaptive = any(d is not None for d in defended)

        def defend(gs: list[torch.Tensor]) -> list[torch.Tensor]:
            per_victim = []
            for i, model in enumerate(defended):
                own = [g[i] for g in gs]
                if model is not None:
                    trial = model(dict(zip(victim.names, own)))
                    own = [trial[n] for n in victim.names]
                per_victim.append(own)
            return [torch.stack(layer) for layer in zip(*per_victim)]

        fast = None
        masks = [factored_masks(d) for d in defended]
        if (self.backend in ("auto", "factored") and cfg.fast and c0.update_kind == "gradient"
                and supports(victim.model) is None and all(m is not None for m in masks)):
            fast = FactoredMatcher(victim.model, c0.bn_mode == "train", victim.names, targets, weights,
                                   cfg.objective, cfg.objective_scale,
                                   matching_precision(cfg.precision, device, c0.bn_mode == "train"),
                                   _stacked_masks(masks, targets, victim.names))
        thresholds = torch.tensor([exact_threshold(ctx.matcher) for ctx in ctxs])
        state = {"fast": fast}
        self.used_backend = "factored" if fast is not None else exact_backend

        def matching(inp5: torch.Tensor) -> torch.Tensor:
            if state["fast"] is not None:
                loss = state["fast"](inp5, labels)
                if bool((loss.detach().cpu().double() >= thresholds).all()):
                    return loss
                state["fast"] = None  # near an optimum: the exact formulation from now on
            gs = update(inp5, labels)
            if adaptive:
                gs = defend(gs)
            loss = _MatchingMany.apply(cfg.objective, weights, targets, tt, *gs)
            return loss * cfg.objective_scale if cfg.objective_scale != 1.0 else loss

        def objective(x: torch.Tensor) -> torch.Tensor:  # x: (V, N, C', H, W) pixels -> (V,)
            inp = victim.normalise(x.flatten(0, 1))
            per = inp.view(v, -1, *inp.shape[1:])  # (V, N, C, H, W)
            loss = matching(per)
            if cfg.tv > 0:  # total_variation() of each victim's images
                dx = (per[..., :, :-1] - per[..., :, 1:]).abs().flatten(1).mean(1)
                dy = (per[..., :-1, :] - per[..., 1:, :]).abs().flatten(1).mean(1)
                loss = loss + cfg.tv * (dx + dy)
            if cfg.l2 > 0:
                loss = loss + cfg.l2 * torch.linalg.vector_norm(per.flatten(1), dim=1)
            return loss

        total = cfg.iterations * cfg.restarts
        kept: list[tuple[torch.Tensor, float, list[float], dict[str, torch.Tensor]] | None] = [None] * v
        best_restart = [0] * v
        done = 0
        interrupted = False
        for r in range(cfg.restarts):
            for ctx in ctxs:
                ctx.restart = r
                ctx.generator = torch.Generator().manual_seed(cfg.seed * 1000 + r)
            outcomes = self._optimise(ctxs, objective, progress, stop, done, total)
            done += outcomes[0].iterations
            interrupted = outcomes[0].interrupted
            if r > 0 and outcomes[0].iterations == 0:
                break  # stopped before this restart took a step: its starts are no candidates
            for i, (ctx, outcome) in enumerate(zip(ctxs, outcomes)):
                image, variants = attack.select(ctx, outcome)
                loss = attack.score(ctx, image)
                prev = kept[i]
                if prev is None or loss < prev[1]:
                    kept[i], best_restart[i] = (image, loss, outcome.history, variants), r
            if interrupted:
                break
        seconds = time.perf_counter() - t0
        results = []
        for i, ctx in enumerate(ctxs):
            entry = kept[i]
            assert entry is not None
            image, final_loss, history, variants = entry
            diagnostics = {**attack.diagnostics(ctx, best_restart[i]), "best_restart": float(best_restart[i]),
                           "labels_recovered": float(ctx.labels_recovered), "victims_together": float(v),
                           "victim_it_per_s": v * done / seconds if seconds > 0 else 0.0,
                           "seconds_per_iteration": seconds / max(done, 1)}
            results.append(AttackResult(images=attack.returned(ctx, image), labels=ctx.labels.cpu(),
                                        loss_history=history, iterations=done, seconds=seconds,
                                        final_loss=final_loss, interrupted=interrupted,
                                        it_per_s=done / seconds if seconds > 0 else 0.0,
                                        variants={k: attack.returned(ctx, x) for k, x in variants.items()},
                                        diagnostics=diagnostics))
        return results

    def _optimise(self, ctxs: list[InversionContext], objective, progress, stop, offset: int,
                  total: int) -> list[RestartOutcome]:
        attack, cfg = self.attack, self.attack.config
        victim = ctxs[0].victim
        v = len(ctxs)
        x0 = torch.stack([attack.initial_images(ctx).detach() for ctx in ctxs])  # (V, N, C', H, W)
        z = victim.pixels_to_param(x0.flatten(0, 1)).view_as(x0).clone().requires_grad_(True)
        unit = x0[:1, :1]
        lo = victim.pixels_to_param(torch.zeros_like(unit[0])).unsqueeze(0)
        hi = victim.pixels_to_param(torch.ones_like(unit[0])).unsqueeze(0)
        opt, sched = attack._optimizer(z)
        best_x = [x0[i].clone() for i in range(v)]
        best_loss = [math.inf] * v
        hist: list[list[float]] = [[] for _ in range(v)]

        def pixels(zz: torch.Tensor) -> torch.Tensor:
            return victim.param_to_pixels(zz.flatten(0, 1)).view_as(zz)

        def outcomes(final: torch.Tensor, final_loss: list[float], n_it: int, interrupted: bool) -> list[RestartOutcome]:
            return [RestartOutcome(best_x[i], best_loss[i], final[i], final_loss[i], hist[i], n_it, interrupted)
                    for i in range(v)]

        for it in range(cfg.iterations):
            if stopped(stop):
                return outcomes(pixels(z).detach().clone(), [math.inf] * v, it, True)
            x = pixels(z)
            losses = objective(x)
            (grad,) = torch.autograd.grad(losses.sum(), z)
            values = losses.detach().double().tolist()
            xd = x.detach()
            for i, val in enumerate(values):
                hist[i].append(val)
                if val < best_loss[i]:
                    best_loss[i] = val
                    best_x[i] = xd[i].clone()
            if cfg.signed:
                grad = grad.sign()
            scales = [attack.pixel_grad_scale(ctx, it, xd[i]) for i, ctx in enumerate(ctxs)]
            if any(s is not None for s in scales):
                grad = grad * torch.stack([s if s is not None else torch.ones_like(xd[i])
                                           for i, s in enumerate(scales)])
            z.grad = grad
            opt.step()
            sched.step()
            with torch.no_grad():
                if cfg.box:
                    torch.maximum(z, lo, out=z)
                    torch.minimum(z, hi, out=z)
                xs = pixels(z)
                for i, new in enumerate(attack.on_iterations(ctxs, it, xs, values)):
                    if new is not None:
                        z[i].copy_(victim.pixels_to_param(new.to(z.device)))
            report(progress, offset + it + 1, total, float(sum(values) / v))
        x = pixels(z)
        final = objective(x).detach().double().tolist()
        xd = x.detach().clone()
        for i, val in enumerate(final):
            if val < best_loss[i]:
                best_loss[i], best_x[i] = val, xd[i].clone()
        return outcomes(xd, final, cfg.iterations, False)


def invert_together(attack: GradientInversion, cases: Sequence[AttackCase], progress: Progress | None = None,
                    stop: StopFlag | None = None, device: str | torch.device = "cpu") -> list[AttackResult]:
    """Attack each group of compatible cases together and the rest (or all, with the BN
    prior) one by one; results in the cases' order."""
    if attack.config.bn_stats != 0:
        return [attack.run(c, progress, stop, device) for c in cases]
    results: list[AttackResult | None] = [None] * len(cases)
    for group in compatible_groups(cases):
        part = [cases[i] for i in group]
        done = MultiVictimInversion(attack).run(part, progress, stop, device) if len(part) > 1 else \
            [attack.run(part[0], progress, stop, device)]
        for i, result in zip(group, done):
            results[i] = result
    return results
