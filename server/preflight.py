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
    if fed.algorithm == "fedsgd" and fed.batch_size == 1 and fed.bn_mode == "train" and \
            config.model.name in ("resnet18", "mobilenet_v2") and config.data.image_size < 64:
        raise ConfigError(f"data.image_size: {config.model.name} at {config.data.image_size} px and batch size 1 "
                          "ends in 1x1 feature maps, where BatchNorm in train mode fails: use data.image_size >= 64, "
                          "federation.batch_size >= 2 or federation.bn_mode: eval")
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
    victims = config.threat.victims
    for key, ids in (("ids", victims.ids), ("dev_ids", victims.dev_ids)):
        empty = [p for p in ids if not 0 <= p < len(data.partitions) or len(data.partitions[p]) == 0]
        if empty:
            raise ConfigError(f"threat.victims.{key}: clients {empty} hold no images (clients are 0.."
                              f"{len(data.partitions) - 1}; {len(data.non_empty())} hold images)")
    late = [r for r in config.threat.rounds if r > config.federation.rounds]
    if late:
        log.warning("threat.rounds %s are after the last round (%d): not attacked", late, config.federation.rounds)


__all__ = ["preflight"]
