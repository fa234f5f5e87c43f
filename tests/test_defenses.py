"""Client-side defenses (fl_sim/defenses.py): each changes the update as documented, alone,
composed in order, and in the update the server receives."""
from __future__ import annotations

import pytest
import torch

from fl_sim.config import DefenseConfig
from fl_sim.defenses import DefenseContext, apply_on_update, build_defenses


def _ctx(seed: int = 0) -> DefenseContext:
    return DefenseContext("fedsgd", 1, 0, 0, 0.1, torch.Generator().manual_seed(seed))


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "fc.weight": torch.randn(10, 16, generator=g) * 3,
            "fc.bias": torch.randn(10, generator=g) * 0.1}


def _defenses(*specs: tuple[str, dict]):
    return build_defenses([DefenseConfig(name=n, params=p) for n, p in specs])


def test_pruning_zeroes_exactly_the_rate_and_keeps_the_largest_entries():
    update = _update()
    n = sum(v.numel() for v in update.values())
    pruned = apply_on_update(_defenses(("prune", {"rate": 0.75})), update, _ctx())
    flat = torch.cat([v.flatten() for v in pruned.values()])
    original = torch.cat([v.flatten() for v in update.values()])
    zero = flat == 0
    assert int(zero.sum()) == round(0.75 * n)
    assert torch.equal(flat[~zero], original[~zero])  # what is kept is sent as it was
    assert float(original[~zero].abs().min()) >= float(original[zero].abs().max())  # the largest are kept
    assert [v.shape for v in pruned.values()] == [v.shape for v in update.values()]


@pytest.mark.parametrize("stochastic", [True, False])
def test_quantised_values_lie_on_each_tensors_grid(stochastic):
    update = _update(1)
    bits = 3
    out = apply_on_update(_defenses(("quantize", {"bits": bits, "stochastic": stochastic})), update, _ctx())
    for name, v in update.items():
        q = out[name]
        step = float(v.max() - v.min()) / (2 ** bits - 1)
        j = (q - v.min()) / step
        assert torch.allclose(j, j.round(), atol=1e-4), name  # on the grid min + j * step
        assert len(torch.unique(j.round())) <= 2 ** bits
        assert float((q - v).abs().max()) <= step * (1.0 if stochastic else 0.5) + 1e-5  # the next level at most


def test_stochastic_quantisation_is_unbiased_and_reproducible():
    v = {"w": torch.linspace(-1, 1, 50)}
    defense = _defenses(("quantize", {"bits": 2}))
    draws = 2000
    g = torch.Generator().manual_seed(0)
    ctx = DefenseContext("fedsgd", 1, 0, 0, 0.1, g)
    mean = sum(apply_on_update(defense, v, ctx)["w"] for _ in range(draws)) / draws
    step = 2 / 3
    # each draw is off by at most one step; the mean of 2000 has a standard error <= step / (2 sqrt(2000))
    assert float((mean - v["w"]).abs().max()) < 5 * step / (2 * draws ** 0.5)
    a = apply_on_update(defense, v, _ctx(7))["w"]
    assert torch.equal(a, apply_on_update(defense, v, _ctx(7))["w"])  # the client's seed decides


def test_bad_defense_settings_name_the_key():
    with pytest.raises(ValueError, match=r"defenses\.0\.params: rate must be in"):
        _defenses(("prune", {"rate": 1.5}))
    with pytest.raises(ValueError, match=r"defenses\.1\.params: bits must be in"):
        _defenses(("clip", {}), ("quantize", {"bits": 0}))
    with pytest.raises(ValueError, match=r"defenses\.0\.name.*prune.*quantize"):
        _defenses(("topk", {}))


def test_the_server_receives_the_clipped_then_pruned_update():
    """Composed in order in the client's own step: the case the server attacks holds an update
    with norm <= the bound and exactly the pruned fraction of zeros."""
    from fl_sim.config import parse_config
    from server.cases import simulate_victims

    tree = {
        "name": "defended", "seed": 1,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 8}},
        "model": {"name": "resnet18"},
        "federation": {"num_clients": 8, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd", "batch_size": 1,
                       "bn_mode": "eval"},
        "threat": {"victims": {"mode": "explicit", "ids": [3]}, "rounds": [1]},
        "defenses": [{"name": "clip", "params": {"max_norm": 0.5}}, {"name": "prune", "params": {"rate": 0.9}}],
        "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    (victim,) = simulate_victims(parse_config(tree), [3])
    flat = torch.cat([g.flatten() for g in victim.case.update.values()])
    assert float(torch.linalg.vector_norm(flat)) <= 0.5 + 1e-5
    assert int((flat == 0).sum()) == round(0.9 * flat.numel())
    assert victim.case.meta["defenses"] == "clip,prune"


def test_gaussian_noise_has_the_computed_std_around_the_clipped_update():
    update = {"w": torch.full((200_000,), 0.01)}  # norm 4.47, clipped to 1
    (defense,) = _defenses(("gaussian", {"max_norm": 1.0, "noise_multiplier": 0.5}))
    noisy = apply_on_update([defense], update, _ctx())["w"]
    clipped = update["w"] / float(torch.linalg.vector_norm(update["w"]))
    residual = noisy - clipped
    # std 0.5 * 1; the sample std of 200k draws is within 1 % of it (its own std is 0.16 %)
    assert abs(float(residual.std()) - 0.5) < 0.005 and abs(float(residual.mean())) < 0.005


def test_gaussian_epsilon_falls_as_noise_grows_and_agrees_with_the_accountant():
    from opacus.accountants.utils import get_noise_multiplier

    eps = [_defenses(("gaussian", {"noise_multiplier": z}))[0].epsilon(10) for z in (0.8, 1.6, 3.2, 6.4)]
    assert all(a > b > 0 for a, b in zip(eps, eps[1:]))
    (one,) = _defenses(("gaussian", {"noise_multiplier": 2.0}))
    assert one.epsilon(20) > one.epsilon(10) > one.epsilon(1) > 0 == one.epsilon(0)
    # the library's inverse: the noise it needs for epsilon 8 over 10 participations gives 8 back
    z = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=10, accountant="rdp")
    (calibrated,) = _defenses(("gaussian", {"noise_multiplier": z}))
    assert 7.8 < calibrated.epsilon(10) <= 8.0
    # one participation against the Gaussian mechanism's RDP in closed form, alpha/(2 z^2),
    # turned into (epsilon, delta) by the classic bound: Opacus's tighter conversion is below it
    alphas = torch.linspace(1.5, 200, 4000)
    classic = float(torch.min(alphas / (2 * 2.0 ** 2) + torch.log(torch.tensor(1e5)) / (alphas - 1)))
    assert 0.8 * classic < one.epsilon(1) <= classic + 1e-6


def test_noise_adds_the_configured_std_and_the_clients_seed_decides():
    update = {"w": torch.zeros(200_000), "b": torch.ones(10)}
    (defense,) = _defenses(("noise", {"std": 0.03}))
    noisy = apply_on_update([defense], update, _ctx(3))
    # the sample std of 200k draws is within 1 % of 0.03 (its own relative std is 0.16 %)
    assert abs(float(noisy["w"].std()) - 0.03) < 3e-4 and abs(float(noisy["w"].mean())) < 3e-4
    assert torch.equal(noisy["w"], apply_on_update([defense], update, _ctx(3))["w"])
    assert not torch.equal(noisy["w"], apply_on_update([defense], update, _ctx(4))["w"])


def _soteria_setup():
    from fl_sim.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet", 5).eval()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    update = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) + 0.5
              for i, (n, p) in enumerate(model.named_parameters())}
    ctx = DefenseContext("fedsgd", 1, 0, 0, 0.1, torch.Generator().manual_seed(0), model, inputs)
    return model, inputs, update, ctx


def test_soteria_zeroes_the_fc_columns_of_the_most_revealing_features():
    """The zeroed columns are exactly the `rate` share of features with the lowest
    sum over images of ||dr_f/dx|| / |r_f|, computed here from the full Jacobian."""
    model, inputs, update, ctx = _soteria_setup()
    out = apply_on_update(_defenses(("soteria", {"rate": 0.75})), update, ctx)
    features = model.fc.in_features
    zeroed = (out["fc.weight"] == 0).all(0)
    assert int(zeroed.sum()) == round(0.75 * features)
    for name in update:  # nothing else changes
        if name != "fc.weight":
            assert torch.equal(out[name], update[name]), name
    assert torch.equal(out["fc.weight"][:, ~zeroed], update["fc.weight"][:, ~zeroed])
    rep = lambda x: torch.flatten(model.features(x), 1)  # noqa: E731 - LeNet's representation
    score = torch.zeros(features)
    for x in inputs:
        jac = torch.autograd.functional.jacobian(rep, x[None])[0].flatten(1)  # (features, pixels)
        score += jac.norm(dim=1) / rep(x[None])[0].abs()
    expected = torch.zeros(features, dtype=torch.bool)
    expected[torch.argsort(score)[: round(0.75 * features)]] = True
    assert torch.equal(zeroed, expected)


def test_soteria_probes_estimate_the_exact_mask():
    """Random probes pick nearly the same features as the exact Jacobian (measured on
    ResNet18 at 64 px: 97 % of the mask with 16 probes, 98 % with 64)."""
    model, inputs, update, ctx = _soteria_setup()
    exact = apply_on_update(_defenses(("soteria", {"rate": 0.5})), update, ctx)["fc.weight"] == 0
    probed = apply_on_update(_defenses(("soteria", {"rate": 0.5, "probes": 64})), update, ctx)["fc.weight"] == 0
    exact, probed = exact.all(0), probed.all(0)
    assert int(probed.sum()) == int(exact.sum())
    assert float((exact & probed).sum() / exact.sum()) > 0.85
    with pytest.raises(ValueError, match="needs the client's model"):
        apply_on_update(_defenses(("soteria", {})), update, _ctx())


@pytest.mark.parametrize("spec", [("prune", {"rate": 0.9}), ("clip", {"max_norm": 1.0}),
                                  ("quantize", {"bits": 3, "stochastic": False}), ("soteria", {"rate": 0.5})])
def test_the_attackers_model_of_a_defense_maps_the_true_update_to_the_observed_one(spec):
    """What adaptive attacks rely on: the defense's model, built from the observed update
    alone, turns the client's true update into exactly what the server received."""
    from fl_sim.defenses import adaptive_model

    model, inputs, update, ctx = _soteria_setup()
    defenses = _defenses(spec)
    observed = apply_on_update(defenses, update, ctx)
    simulated = adaptive_model(defenses, observed)(update)
    for name in update:
        assert torch.allclose(simulated[name], observed[name], atol=1e-6), name


def test_adaptive_models_are_differentiable_and_noise_has_none():
    from fl_sim.defenses import adaptive_model

    update = _update()
    for spec in [("prune", {"rate": 0.5}), ("clip", {"max_norm": 0.1}), ("quantize", {"bits": 2, "stochastic": False}),
                 ("quantize", {"bits": 2}), ("gaussian", {"max_norm": 0.1})]:
        defenses = _defenses(spec)
        trial = {k: v.clone().requires_grad_(True) for k, v in _update(5).items()}
        out = adaptive_model(defenses, apply_on_update(defenses, update, _ctx()))(trial)
        sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
        assert all(v.grad is not None for v in trial.values()), spec  # the graph reaches every tensor
        assert sum(float(v.grad.abs().sum()) for v in trial.values()) > 0, spec
    assert adaptive_model(_defenses(("noise", {"std": 0.1})), update) is None


def _defended_victims(defenses, seeds):
    from fl_sim.config import parse_config
    from server.cases import simulate_victims

    for seed in seeds:
        tree = {
            "name": "adaptive", "seed": seed,
            "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 8}},
            "model": {"name": "lenet"},
            "federation": {"num_clients": 8, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd",
                           "batch_size": 1},
            "threat": {"victims": {"mode": "explicit", "ids": [3]}, "rounds": [1]},
            "defenses": defenses, "engine": {"backend": "inprocess"},
            "metrics": {"lpips": False, "id_backend": None},
        }
        yield simulate_victims(parse_config(tree), [3])[0]


@pytest.mark.parametrize("attack,defense,measured", [
    ("invertg", {"name": "prune", "params": {"rate": 0.9}}, "+0.9, +4.9, +7.8"),
    ("idlg-adam", {"name": "clip", "params": {"max_norm": 0.1}}, "+2.6, +2.6, +2.9"),
])
def test_the_adaptive_attack_beats_the_naive_one(attack, defense, measured):
    """Told the defense, the attack applies it to its trial gradients: under 90 % pruning
    (InvertG) and clipping to a tenth of the gradient's norm (iDLG-Adam's L2 matching), its
    reconstructions are closer, paired by victim (PSNR gains over seeds 0-2 given beside)."""
    from attacks.registry import build_attack_at
    from fl_sim.metrics import psnr

    gains = []
    for victim in _defended_victims([defense], range(3)):
        scores = []
        for adaptive in (False, True):
            result = build_attack_at(attack, {"iterations": 200, "adaptive": adaptive}, attack).run(victim.case)
            scores.append(float(psnr(result.images.clamp(0, 1), victim.truth_images)))
        gains.append(scores[1] - scores[0])
    assert sum(gains) / len(gains) > 1.5, (gains, measured)
    assert min(gains) > -0.5, (gains, measured)


def _mixing_victim(defense: dict, seed: int = 0):
    from fl_sim.config import parse_config
    from server.cases import simulate_victims

    tree = {
        "name": "mixed", "seed": seed,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 8}},
        "model": {"name": "lenet"},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 1, "algorithm": "fedsgd", "batch_size": 2},
        "threat": {"victims": {"mode": "explicit", "ids": [1]}, "rounds": [1], "labels_known": True},
        "defenses": [defense], "engine": {"backend": "inprocess"}, "metrics": {"lpips": False, "id_backend": None},
    }
    config = parse_config(tree)
    return config, simulate_victims(config, [1])[0]


@pytest.mark.parametrize("name", ["mixup", "instahide"])
def test_mixing_defenses_train_on_mixtures_of_the_clients_own_images(name):
    """The client's update is the gradient on k-image mixtures of its own data with soft
    labels (rows summing to one), InstaHide's with pixel signs flipped; hard labels are no
    longer sent; the same seed gives the same update."""
    from fl_sim.federated_data import federated_data, stack
    from fl_sim.models import build_model
    from fl_sim.training import fedsgd_gradient
    from server.cases import initial_global_state

    config, victim = _mixing_victim({"name": name, "params": {"k": 3}})
    data = federated_data(config)
    pool, pool_labels = stack(data, data.partitions[1])
    (defense,) = build_defenses(config.defenses)
    ctx = DefenseContext("fedsgd", 1, 1, config.seed, 0.1, torch.Generator().manual_seed(0),
                         pool_images=pool, pool_labels=pool_labels, num_classes=data.num_classes)
    mixed, soft = defense.on_data(victim.truth_images, victim.truth_labels, ctx)
    assert soft.shape == (2, data.num_classes) and torch.allclose(soft.sum(1), torch.ones(2))
    assert int((soft > 0).sum(1).max()) <= 3  # at most k labels in a mixture
    if name == "mixup":  # a convex combination stays within the pool's range, pixel by pixel
        assert bool((mixed >= pool.min(0).values - 1e-6).all() and (mixed <= pool.max(0).values + 1e-6).all())
    else:  # signs flipped about grey: some pixels land outside what any mixture could give
        assert bool(((mixed < pool.min(0).values - 1e-3) | (mixed > pool.max(0).values + 1e-3)).any())
    assert not torch.allclose(mixed, victim.truth_images)
    assert victim.case.labels is None  # soft labels are not sent

    # the update the server got is the gradient on the mixtures (the client's own seeded draw)
    from fl_sim.federated_data import client_seed

    ctx.generator = torch.Generator().manual_seed(client_seed(config, 1, 1))
    mixed, soft = defense.on_data(victim.truth_images, victim.truth_labels, ctx)
    model = build_model("lenet", data.num_classes)
    model.load_state_dict(initial_global_state(config, data))
    grads, _ = fedsgd_gradient(model, data.dataset.normalise(mixed), soft, config.federation.bn_mode)
    for n, g in grads.items():
        assert torch.allclose(victim.case.update[n], g, atol=1e-6), n
    assert torch.equal(_mixing_victim({"name": name, "params": {"k": 3}})[1].case.update["fc.weight"],
                       victim.case.update["fc.weight"])


def test_ats_candidates_do_what_the_policy_table_says():
    """A vertical bar moves by round(150/331 x 9/9 x width) under candidate 3 (translateX,
    level 9); contrast at level 6 scales a grey image's spread by 1 +- 1/3; the table holds
    the 50 published candidates and a bad index names the allowed range."""
    from fl_sim.ats import CANDIDATES, apply_operation

    assert len(CANDIDATES) == 50
    bar = torch.zeros(3, 32, 32)
    bar[:, :, 4] = 1.0
    moved = apply_operation(bar, *CANDIDATES[3], torch.Generator().manual_seed(0))
    shift = round(150 / 331 * 32)
    column = int(moved[0].sum(0).argmax())
    assert column in (4 + shift, 4 - shift) or (4 - shift < 0 and moved.sum() == 0)
    grey = 0.3 + 0.2 * torch.rand(1, 16, 16).expand(3, 16, 16)
    out = apply_operation(grey, *CANDIDATES[1], torch.Generator().manual_seed(0))
    ratio = float(out.std() / grey.std())
    assert min(abs(ratio - 4 / 3), abs(ratio - 2 / 3)) < 0.02, ratio
    with pytest.raises(ValueError, match=r"defenses.0.params: policy '3-1-50'.*0..49"):
        _defenses(("ats", {"policy": "3-1-50"}))


def test_ats_policy_transforms_each_image_reproducibly_and_keeps_labels():
    """The hybrid policy: every image changes, labels stay, the client's seed decides; one
    chain per image (with crop and flip off and the single chain "3", every image is the
    translated original)."""
    from fl_sim.ats import CANDIDATES, apply_operation

    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    (ats,) = _defenses(("ats", {}))
    a, la = ats.on_data(images, labels, _ctx(1))
    b, _ = ats.on_data(images, labels, _ctx(1))
    c, _ = ats.on_data(images, labels, _ctx(2))
    assert torch.equal(la, labels) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(not torch.allclose(x, y) for x, y in zip(a, images))
    (shift_only,) = _defenses(("ats", {"policy": "3", "crop_flip": False}))
    out, _ = shift_only.on_data(images, labels, _ctx(3))
    for x, y in zip(out, images):
        options = [apply_operation(x0, *CANDIDATES[3], g) for x0, g in
                   ((y, torch.Generator().manual_seed(s)) for s in range(8))]
        assert any(torch.allclose(x, o) for o in options)


def test_adaptive_attack_on_victims_together_equals_one_by_one():
    """The batched path passes each victim's trial gradients through that victim's own model
    of the defense, as the attack alone does: same images and losses (rounding aside; see
    test_attacks_multi for the tolerances), and the loss is the defended one."""
    from attacks.multi import MultiVictimInversion
    from attacks.registry import build_attack_at
    from fl_sim.config import parse_config
    from server.cases import simulate_victims

    tree = {
        "name": "adaptive-together", "seed": 0,
        "data": {"name": "synthetic", "image_size": 32, "options": {"identities": 4, "per_identity": 8}},
        "model": {"name": "lenet"},
        "federation": {"num_clients": 8, "clients_per_round": 3, "rounds": 1, "algorithm": "fedsgd", "batch_size": 1},
        "threat": {"victims": {"mode": "explicit", "ids": [1, 3, 5]}, "rounds": [1]},
        "defenses": [{"name": "prune", "params": {"rate": 0.9}}], "engine": {"backend": "inprocess"},
        "metrics": {"lpips": False, "id_backend": None},
    }
    cases = [v.case for v in simulate_victims(parse_config(tree), [1, 3, 5])]
    params = {"iterations": 40, "objective_scale": 1.0, "adaptive": True}
    attack = build_attack_at("gradinv", params, "gradinv")
    alone = [attack.run(c) for c in cases]
    together = MultiVictimInversion(attack).run(cases)
    naive = build_attack_at("gradinv", {**params, "adaptive": False}, "gradinv")
    for case, a, t in zip(cases, alone, together):
        assert float((a.images - t.images).abs().mean()) < 1e-3
        assert t.final_loss == pytest.approx(a.final_loss, rel=1e-3)
        ctx = naive.prepare(case)  # the same image matched without the defense's model scores otherwise
        assert naive.score(ctx, t.images) != pytest.approx(t.final_loss, rel=1e-2)


def test_soteria_probes_are_the_jacobian_vector_products():
    """The probes' central differences are r's JVPs along the same directions (autograd's
    forward mode as the reference) on ResNet18: equal to float precision wherever no ReLU
    switches within the step, and the features they select are the JVPs' (measured on
    ResNet18 at 64 px, 16 probes: 99.5-100 % of the mask at rate 0.4, 100 % at 0.8)."""
    import torch.autograd.forward_ad as fwad

    from fl_sim.defenses import Soteria, SoteriaConfig
    from fl_sim.models import build_model, last_linear

    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captured = []
    hook = last_linear(model).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    probes = 8
    norms, r = Soteria(SoteriaConfig(rate=0.5, probes=probes))._estimated(model, inputs, captured,
                                                                         torch.Generator().manual_seed(2))
    v = torch.randn((2 * probes, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fwad.dual_level():
        model(fwad.make_dual(inputs.repeat(probes, 1, 1, 1), v))
        r_ad, jv = fwad.unpack_dual(captured[-1])
    hook.remove()
    expected = jv.view(probes, 2, -1).pow(2).mean(0).sqrt()
    torch.testing.assert_close(r, r_ad[:2], rtol=1e-5, atol=1e-6)
    relative = ((norms - expected).abs() / expected.clamp_min(1e-6)).flatten()
    assert float(relative.median()) < 0.01, float(relative.median())
    lowest = lambda n: set(torch.argsort((n / r.abs().clamp_min(1e-12)).sum(0))[:256].tolist())  # noqa: E731
    assert len(lowest(norms) & lowest(expected)) / 256 > 0.95
