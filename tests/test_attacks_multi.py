"""The fast paths: factored matching, per-victim expanded layers, attacking victims together.

Each must compute the same thing as the plain formulation; speed is the benchmark's business.
"""
from __future__ import annotations

import pytest
import torch

from attacks.engine import GradientMatcher, VictimModel, reference_objective
from attacks.expanded import ExpandedModel
from attacks.factored import FactoredMatcher
from attacks.multi import MultiVictimInversion, compatible, compatible_groups, invert_together
from attacks.registry import build_attack
from attacks.synthetic import face_image, make_case

torch.set_num_threads(1)


def _victims(model: str, size: int, n: int, v: int, bn: str = "train", **kw):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(v, n, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (v, n), generator=g)
    first = make_case(model, 10, imgs[0], labels[0], bn_mode=bn, **kw)
    cases = [first] + [make_case(model, 10, imgs[i], labels[i], weights=first.weights, bn_mode=bn, **kw)
                       for i in range(1, v)]
    return cases, imgs, labels


@pytest.mark.parametrize("model,size,n,bn,kind", [
    ("resnet18", 64, 1, "train", "l2"),
    ("resnet18", 64, 1, "train", "cosine"),
    ("resnet18", 64, 2, "train", "cosine-layer"),
    ("resnet18", 32, 1, "eval", "cosine"),
])
def test_factored_matching_equals_materialised_gradients(model, size, n, bn, kind):
    cases, _, labels = _victims(model, size, n, 2, bn)
    victim = VictimModel(cases[0])
    weights = [1.0 + 0.1 * i for i in range(len(victim.names))]
    targets = [torch.stack([c.update[k] for c in cases]) for k in victim.names]
    fm = FactoredMatcher(victim.model, bn == "train", victim.names, targets, weights, kind)
    x = torch.rand(2, n, 3, size, size, generator=torch.Generator().manual_seed(5), requires_grad=True)
    fast = fm(victim.normalise(x.flatten(0, 1)).view(2, n, 3, size, size), labels)
    (d_fast,) = torch.autograd.grad(fast.sum(), x)
    for i, case in enumerate(cases):
        plain = GradientMatcher([case.update[k] for k in victim.names], kind, weights)(victim.simulate(x[i], labels[i]))
        (d_plain,) = torch.autograd.grad(plain, x)
        assert float(fast[i].detach()) == pytest.approx(float(plain.detach()), rel=5e-3)
        assert float((d_fast[i] - d_plain[i]).norm() / d_plain[i].norm()) < 5e-3


@pytest.mark.parametrize("defense,mobile", [({"name": "prune", "params": {"rate": 0.9}}, False),
                                            ({"name": "soteria", "params": {"rate": 0.8}}, False),
                                            ({"name": "prune", "params": {"rate": 0.8}}, True)])
def test_factored_matching_models_a_zeroing_defense_exactly(defense, mobile):
    """An adaptive attack under pruning or Soteria matches the trial gradient only where the
    observed update is non-zero; the factored form (|M dW|^2 through column products, or dW
    formed and masked) must give the loss and image gradient of the defense model applied to
    materialised gradients."""
    from fl_sim.defenses import ZeroPattern, adaptive_model_of, apply_on_update, build_defenses, DefenseConfig, \
        DefenseContext

    model, size = ("mobilenet_v2", 32) if mobile else ("resnet18", 64)
    cases, imgs, labels = _victims(model, size, 1, 2, "eval")
    victim = VictimModel(cases[0])
    defenses = build_defenses([DefenseConfig(**defense)])
    observed = []
    for i, case in enumerate(cases):
        ctx = DefenseContext("fedsgd", 1, i, 0, 0.1, torch.Generator().manual_seed(i), model=victim.model,
                             inputs=victim.normalise(imgs[i]))
        update = apply_on_update(defenses, {k: case.update[k] for k in victim.names}, ctx)
        observed.append(update)
    models = [adaptive_model_of([defense], o) for o in observed]
    assert all(isinstance(m, ZeroPattern) for m in models)
    zeros = float(sum((observed[0][k] == 0).sum() for k in victim.names)) / sum(observed[0][k].numel() for k in victim.names)
    assert zeros > 0.0
    targets = [torch.stack([o[k] for o in observed]) for k in victim.names]
    masks = {k: torch.stack([m.masks[k] for m in models]) for k in models[0].masks}
    weights = [1.0] * len(targets)
    fm = FactoredMatcher(victim.model, False, victim.names, targets, weights, "cosine", masks=masks)
    x = torch.rand(2, 1, 3, size, size, generator=torch.Generator().manual_seed(5), requires_grad=True)
    fast = fm(victim.normalise(x.flatten(0, 1)).view_as(x), labels)
    (d_fast,) = torch.autograd.grad(fast.sum(), x)
    unmasked = FactoredMatcher(victim.model, False, victim.names, targets, weights, "cosine")(
        victim.normalise(x.flatten(0, 1)).view_as(x), labels)
    for i in range(2):
        trial = models[i](dict(zip(victim.names, victim.simulate(x[i], labels[i]))))
        plain = GradientMatcher([observed[i][k] for k in victim.names], "cosine", weights)([trial[k] for k in victim.names])
        (d_plain,) = torch.autograd.grad(plain, x)
        assert float(fast[i].detach()) == pytest.approx(float(plain.detach()), rel=5e-3)
        assert float((d_fast[i] - d_plain[i]).norm() / d_plain[i].norm()) < 5e-3
        # and the mask matters: without it the loss is another one
        assert abs(float(unmasked[i].detach()) - float(plain.detach())) > 20 * abs(float(fast[i].detach()) - float(plain.detach()))


def test_engine_hands_over_to_exact_matching_near_the_optimum():
    # LeNet's gradients are nearly collinear: 1 - cos starts below 1e-3, where the factored
    # dot-product form would be rounding noise; the engine must switch at once.
    case = make_case("lenet", 10, face_image(32), torch.tensor([3]))
    attack = build_attack("invertg", iterations=1)
    ctx = attack.prepare(case)
    assert ctx.state["factored"] is not None
    x = attack.initial_images(ctx)
    loss = attack.matching(ctx, x)
    assert ctx.state["factored"] is None
    assert float(loss.detach()) == pytest.approx(float(ctx.matcher(ctx.victim.simulate(x, ctx.labels)).detach()), rel=1e-6)
    # ResNet18 far from the optimum keeps the factored form
    cases, _, _ = _victims("resnet18", 64, 1, 1)
    ctx = attack.prepare(cases[0])
    attack.matching(ctx, attack.initial_images(ctx))
    assert ctx.state["factored"] is not None


def test_factored_mobilenet_depthwise_in_float64():
    # MobileNetV2 at random init is too ill-conditioned for a float32 comparison; in float64 the
    # factored form (depthwise layers, ReLU6 in place, residual adds) must agree to rounding.
    torch.set_default_dtype(torch.float64)
    try:
        cases, _, labels = _victims("mobilenet_v2", 64, 1, 1)
        victim = VictimModel(cases[0])
        victim.mean, victim.std = victim.mean.double(), victim.std.double()
        targets = [cases[0].update[k].double().unsqueeze(0) for k in victim.names]
        fm = FactoredMatcher(victim.model, True, victim.names, targets, [1.0] * len(targets), "cosine")
        x = torch.rand(1, 1, 3, 64, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        fast = fm(victim.normalise(x[0]).unsqueeze(0), labels)
        (d_fast,) = torch.autograd.grad(fast.sum(), x)
        plain = GradientMatcher([t[0] for t in targets], "cosine").reference(victim.simulate(x[0], labels[0]))
        (d_plain,) = torch.autograd.grad(plain, x)
        assert float(fast[0].detach()) == pytest.approx(float(plain.detach()), rel=1e-9)
        assert float((d_fast - d_plain).norm() / d_plain.norm()) < 1e-8
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("model,size,n,kw", [
    ("resnet18", 64, 2, {}),
    ("lenet", 32, 2, {"update_kind": "weight-diff", "local_lr": 0.1, "local_steps": 3, "local_batch_size": 1}),
])
def test_expanded_updates_equal_the_clients(model, size, n, kw):
    cases, imgs, labels = _victims(model, size, n, 3, **kw)
    victim = VictimModel(cases[0])
    em = ExpandedModel(victim.model, True)
    c0 = cases[0]
    inp = victim.normalise(imgs.flatten(0, 1)).view_as(imgs)
    gs = em.update(victim.param_dict(), victim.names, inp, labels, c0.update_kind, c0.local_lr, c0.local_steps,
                   c0.local_batch_size, create_graph=False)
    for i, case in enumerate(cases):
        scale = max(float(case.update[k].norm()) for k in victim.names)
        for k, g in zip(victim.names, gs):
            ref = case.update[k]
            assert float((g[i] - ref).norm()) <= 1e-3 * float(ref.norm()) + 1e-5 * scale, (i, k)


@pytest.mark.parametrize("backend", ["factored", "expanded", "vmap"])
def test_together_equals_one_by_one(backend):
    imgs = [face_image(32, i) for i in range(3)]
    first = make_case("lenet", 10, imgs[0], torch.tensor([1]))
    cases = [first] + [make_case("lenet", 10, im, torch.tensor([lab]), weights=first.weights)
                       for im, lab in zip(imgs[1:], [5, 7])]
    attack = build_attack("gradinv", iterations=40, objective_scale=1.0, fast=backend == "factored")
    alone = [attack.run(c) for c in cases]
    multi = MultiVictimInversion(attack, backend=backend)
    together = multi.run(cases)
    assert multi.used_backend == backend or (backend == "factored" and multi.used_backend == "expanded")
    for case, a, t in zip(cases, alone, together):
        assert a.labels.tolist() == t.labels.tolist()
        # Unsigned Adam normalises each pixel's step by its gradient's running magnitude, so
        # float rounding (batched vs single kernels) moves the few pixels whose gradient is
        # tiny: the largest pixel difference (measured 1e-4 to 1.6e-3 here) depends on the
        # kernels, the mean does not: measured 2e-6 to 1e-5, against 0.15 for another
        # victim's reconstruction. 1e-3 sits 100x above the one and 100x below the other.
        assert float((a.images - t.images).abs().mean()) < 1e-3
        # The losses of those images: measured within 1e-5 relative.
        assert t.final_loss == pytest.approx(a.final_loss, rel=1e-3)
        # Each victim's final_loss is the objective of its returned image, alone.
        ref = reference_objective(case, t.images, t.labels, attack.config)
        assert t.final_loss == pytest.approx(ref, rel=1e-4)  # float32 rounding, see test_attacks_engine
        assert t.diagnostics["victims_together"] == 3.0


def test_together_resnet_factored_matches_alone():
    # Trajectories of (signed) Adam diverge at pixels whose gradient is rounding noise, so only
    # the first evaluation (same start image) is compared; the gradients are checked above.
    cases, _, _ = _victims("resnet18", 64, 1, 2)
    attack = build_attack("invertg", iterations=3)
    alone = [attack.run(c) for c in cases]
    multi = MultiVictimInversion(attack)
    together = multi.run(cases)
    assert multi.used_backend == "factored"
    for a, t in zip(alone, together):
        assert t.loss_history[0] == pytest.approx(a.loss_history[0], rel=1e-4)
        assert len(t.loss_history) == 3 and t.images.shape == (1, 3, 64, 64)
        assert t.labels.tolist() == a.labels.tolist()


def test_incompatible_cases_run_one_by_one():
    a = make_case("lenet", 10, face_image(32, 0), torch.tensor([1]), seed=0)
    b = make_case("lenet", 10, face_image(32, 1), torch.tensor([2]), seed=1)  # other weights
    assert "weights" in compatible([a, b])
    with pytest.raises(ValueError, match="together"):
        MultiVictimInversion(build_attack("invertg", iterations=2)).run([a, b])
    res = invert_together(build_attack("invertg", iterations=2), [a, b])
    assert len(res) == 2 and "victims_together" not in res[0].diagnostics


def test_compatible_cases_go_together_beside_an_odd_one():
    """One odd case (other weights) runs alone; the compatible ones still form one batch, and
    the results come back in the cases' order."""
    a = make_case("lenet", 10, face_image(32, 0), torch.tensor([1]), seed=0)
    b = make_case("lenet", 10, face_image(32, 1), torch.tensor([2]), seed=1)  # other weights
    c = make_case("lenet", 10, face_image(32, 2), torch.tensor([3]), seed=0)
    assert compatible_groups([a, b, c]) == [[0, 2], [1]]
    res = invert_together(build_attack("invertg", iterations=2), [a, b, c])
    assert [r.labels.tolist() for r in res] == [[1], [2], [3]]
    assert "victims_together" in res[0].diagnostics and "victims_together" in res[2].diagnostics
    assert "victims_together" not in res[1].diagnostics


@pytest.mark.parametrize("name,overrides", [
    ("invertg", {"restarts": 2, "tv": 0.0}),
    # DFLeak's select through the together path: the final iterate, lowest-loss as a variant
    ("dfleak", {"init_search": "off", "epsilon": 1e9, "restorer": "none", "select": "final"}),
])
def test_together_final_loss_is_each_victims_objective(name, overrides):
    imgs = [face_image(32, i) for i in range(2)]
    first = make_case("lenet", 10, imgs[0], torch.tensor([1]))
    cases = [first, make_case("lenet", 10, imgs[1], torch.tensor([6]), weights=first.weights)]
    attack = build_attack(name, iterations=20, **overrides)
    together = MultiVictimInversion(attack).run(cases)
    for case, t in zip(cases, together):
        ref = reference_objective(case, t.images, t.labels, attack.config)
        assert t.final_loss == pytest.approx(ref, rel=1e-4)  # float32 rounding, see test_attacks_engine
        assert len(t.loss_history) == 20 and not t.interrupted
        if name == "dfleak":
            assert set(t.variants) == {"lowest-loss", "lowest-loss-after-restoration"}
            assert t.diagnostics["trigger_iteration"] == 0.0
        else:
            assert t.diagnostics["best_restart"] in (0.0, 1.0) and t.iterations == 40


def test_dfleak_together_restores_each_victim_as_alone():
    """DFLeak's whole pipeline on victims together (init search, restoration events fitted in
    one batch of the real GAN prior, pixel schedule): each victim's run is its run alone.
    Measured: mean pixel difference 2e-8 to 4e-4 (a restoration's mask can flip a pixel whose
    two candidates tie within rounding) against 0.15 between two victims' reconstructions;
    losses within 4e-4 relative."""
    imgs = [face_image(32, i) for i in range(3)]
    first = make_case("lenet", 10, imgs[0], torch.tensor([1]))
    cases = [first] + [make_case("lenet", 10, im, torch.tensor([lab]), weights=first.weights)
                       for im, lab in zip(imgs[1:], [5, 7])]
    attack = build_attack("dfleak", iterations=24, signed=False, epsilon=1e9, restorations=2, public_size=12,
                          restorer_params={"steps": 3, "candidates": 4, "restarts": 1})
    alone = [attack.run(c) for c in cases]
    together = MultiVictimInversion(attack).run(cases)
    for a, t in zip(alone, together):
        assert float((a.images - t.images).abs().mean()) < 1e-2
        assert t.final_loss == pytest.approx(a.final_loss, rel=5e-3)
        for key in ("trigger_iteration", "restoration_events", "replaced_share", "init_index"):
            assert t.diagnostics[key] == a.diagnostics[key], key
        assert t.diagnostics["restoration_events"] == 4.0  # shares 25-100 % (0 % replaces nothing)
    assert float((together[0].images - together[1].images).abs().mean()) > 0.05
