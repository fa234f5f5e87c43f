"""Everything a run needs, checked before anything is written (`fl-sim run`, `flwr run`, the
Python API): a bad config never leaves a half-made run directory behind."""
from __future__ import annotations

import logging

from fl_sim.config import ConfigError, ExperimentConfig

log = logging.getLogger("fl_sim")


def preflight(config: ExperimentConfig) -> None:
    """Check everything a run needs before anything is written: every attack and defense with
    typed settings, the data (loaded: a missing root fails here), the victims, the reference
    attack. A problem is a `ConfigError` of one line naming the key."""
    from fl_sim.defenses import build_defenses
    from fl_sim.federated_data import federated_data
    from server.attack_runner import build

    try:
        build_defenses(config.defenses)
        for i, attack in enumerate(config.attacks):
            build(attack, where=f"attacks.{i}.params")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    keys = [a.key for a in config.attacks]
    ref = config.metrics.reference
    if ref is not None and ref not in keys:
        raise ConfigError(f"metrics.reference: {ref!r} is not a configured attack; allowed: {', '.join(keys) or 'none'}")
    fed = config.federation
    if fed.secure_aggregation is not None:
        from server.secure_aggregation import workflow

        try:  # Flower's own checks of the protocol's settings
            workflow(fed.secure_aggregation, 1.0, None)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"federation.secure_aggregation: {exc}") from None
    try:
        data = federated_data(config)
    except (ValueError, FileNotFoundError) as exc:  # DataError and a loader's own checks
        raise ConfigError(f"data: {exc}") from None
    _check_batchnorm_batches(config, data)
    victims = config.threat.victims
    for key, ids in (("ids", victims.ids), ("dev_ids", victims.dev_ids)):
        empty = [p for p in ids if not 0 <= p < len(data.partitions) or len(data.partitions[p]) == 0]
        if empty:
            raise ConfigError(f"threat.victims.{key}: clients {empty} hold no images (clients are 0.."
                              f"{len(data.partitions) - 1}; {len(data.non_empty())} hold images)")
    late = [r for r in config.threat.rounds if r > config.federation.rounds]
    if late:
        log.warning("threat.rounds %s are after the last round (%d): not attacked", late, config.federation.rounds)


def _check_batchnorm_batches(config: ExperimentConfig, data) -> None:
    """BatchNorm in train mode normalises each channel over batch x height x width values. With
    2 of them every output is +1 or -1 and its gradient explodes (MobileNetV2 at 32 px, FedAvg
    on batches of 2: weights at 1e21 after two local steps, NaN loss in round 1); with 1 torch
    refuses. The smallest feature map a BatchNorm layer sees comes from one dry forward pass."""
    import torch

    from fl_sim.models import build_model
    from fl_sim.training import batchnorm_layers

    fed = config.federation
    sizes = [len(p) for p in data.partitions if len(p) > 0]
    if fed.bn_mode != "train" or not sizes:
        return
    model = build_model(config.model.name, data.num_classes)
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, 0].numel()))
             for m in batchnorm_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *data.image_shape))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        return
    batch = min(fed.batch_size, min(sizes))  # a client holding fewer images trains on all of them
    values = batch * min(seen)
    if values <= 2:
        smallest = "" if batch == fed.batch_size else f" (the smallest client holds {batch})"
        raise ConfigError(
            f"federation.batch_size: {config.model.name} at {config.data.image_size} px ends in feature maps of "
            f"{min(seen)} value(s) per channel, so BatchNorm in train mode normalises {values} values per channel "
            f"on batches of {batch}{smallest}: training diverges or fails. Use federation.batch_size >= "
            f"{-(-3 // min(seen))}, a larger data.image_size, or federation.bn_mode: eval")


__all__ = ["preflight"]
