"""The attack registry: presets by name, each with a typed config of its hyper-parameters."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, TypeVar

from attacks.base import Attack

ATTACKS: dict[str, type[Attack]] = {}
A = TypeVar("A", bound=type[Attack])


def register_attack(name: str) -> Callable[[A], A]:
    def wrap(cls: A) -> A:
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} is registered twice")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return wrap


# Modules whose import registers presets; a module not written yet is skipped.
BUILTIN_MODULES = ("attacks.baselines", "attacks.ggl", "attacks.dfleak")


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def config_fields(name: str) -> dict[str, Any]:
    """The hyper-parameters of an attack and their defaults (for docs and the CLI)."""
    cls = _lookup(name)
    return {f.name: getattr(cls.Config(), f.name) for f in dataclasses.fields(cls.Config)}


def _lookup(name: str) -> type[Attack]:
    _load_builtin()
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name]


def build_attack(name: str, **overrides: Any) -> Attack:
    """An attack preset with some hyper-parameters overridden.

    An unknown key is a ValueError naming it and the allowed keys; a bad value is a
    ValueError from the config's own validation.
    """
    cls = _lookup(name)
    allowed = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(allowed)}")
    try:
        config = cls.Config(**overrides)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ValueError(f"attack {name!r}: {exc}") from exc
    return cls(config)
