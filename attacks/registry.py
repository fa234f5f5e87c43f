"""The attack registry: presets by name, each with a typed config of its hyper-parameters.

Built on the project's one generic registry (`fl_sim.registry`): an unknown preset names the
allowed ones; a bad setting (unknown key, wrong type, out of range) is one line naming it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attacks.base import Attack
from fl_sim.registry import Registry, build_settings, setting_defaults

# Modules whose import registers the presets.
ATTACKS: Registry[type[Attack]] = Registry("attack", builtin=("attacks.baselines", "attacks.ggl", "attacks.dfleak"))
register_attack = ATTACKS.register


def config_fields(name: str) -> dict[str, Any]:
    """The hyper-parameters of an attack and their defaults (for docs and the CLI)."""
    return setting_defaults(ATTACKS.get(name).Config)


def build_attack(name: str, **overrides: Any) -> Attack:
    """An attack preset with some hyper-parameters overridden (a ValueError on bad input)."""
    return build_attack_at(name, overrides, where=name)


def build_attack_at(name: str, params: Mapping[str, Any], where: str) -> Attack:
    """As `build_attack`, with `where` (e.g. "attacks.0.params") naming the settings in errors."""
    cls = ATTACKS.get(name)
    return cls(build_settings(cls.Config, params, where))


__all__ = ["ATTACKS", "register_attack", "config_fields", "build_attack", "build_attack_at"]
