"""One generic registry for everything chosen by name in a config: attacks, defenses,
restorers, data sets, partitioners, models, face embedders.

    MODELS: Registry[ModelFactory] = Registry("model")

    @MODELS.register("resnet18")
    def _resnet18(num_classes): ...

    MODELS.get("resnet18")   # unknown names: UnknownName naming the kind and the choices

A registry is a read-only mapping (`name in MODELS`, `sorted(MODELS)`). Kinds whose entries
live in modules that must be imported first (the attack presets, say) name those modules
in `builtin`; they are imported on first lookup, so importing the registry stays cheap.

Typed settings: an entry's hyper-parameters are a dataclass (`Config`); `build_settings`
validates user-given values against its field types with pydantic and turns any problem
into one line that names the setting and what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib
import threading
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")


class UnknownName(ValueError, KeyError):
    """A name no entry of the registry has; the message lists the allowed names.

    A ValueError (bad input) and a KeyError (a failed lookup), so callers that catch either
    keep working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, kind: str, builtin: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._builtin = builtin
        self._loaded = not builtin
        self._loading = False
        self._lock = threading.RLock()  # threads (benchmark shards, Ray's server thread) look up at once
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a class or factory under `name` (a class gets `.name`)."""

        def wrap(entry: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not entry and _qualname(known) != _qualname(entry):
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if isinstance(entry, type):
                entry.name = name  # type: ignore[attr-defined]
            self._entries[name] = entry
            return entry

        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # done meanwhile, or a lookup from a module being imported
                return
            self._loading = True
            try:
                for module in self._builtin:
                    try:
                        importlib.import_module(module)
                    except ModuleNotFoundError as exc:
                        if exc.name != module:  # a missing dependency of a module that exists
                            raise
            finally:
                self._loading = False
            self._loaded = True

    def get(self, name: str) -> T:  # type: ignore[override]
        self._load()
        if name not in self._entries:
            allowed = ", ".join(sorted(self._entries)) or "none registered"
            raise UnknownName(f"unknown {self.kind} {name!r}; allowed: {allowed}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def _qualname(entry: Any) -> str:
    # Re-importing a module (e.g. a test reloading it) registers a new object of the same name.
    return f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', id(entry))}"


# ---------------------------------------------------------------------------------------
# Typed settings of registered entries


class SettingsError(ValueError):
    """A bad setting: one line naming it and what is allowed."""


def setting_defaults(config_cls: type) -> dict[str, Any]:
    """The settings of a dataclass config and their defaults (for docs and error messages)."""
    default = config_cls()
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(config_cls)}


def build_settings(config_cls: type[T], params: Mapping[str, Any], where: str) -> T:
    """An instance of the dataclass `config_cls` from user-given `params`.

    Every value is validated against its field's type first (so `iterations=abc` fails as
    "where.iterations: ... valid integer", not later inside the attack), then the
    dataclass's own `__post_init__` checks run. `where` prefixes every message (for
    example "attacks.0.params" or "attack 'invertg'").
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise SettingsError(f"{where}: no setting {', '.join(map(repr, unknown))}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for key, value in params.items():
        values[key] = _validated(hints[key], value, f"{where}.{key}")
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{where}: {exc}") from None


_ADAPTERS: dict[Any, TypeAdapter] = {}
_LAX = ConfigDict(arbitrary_types_allowed=True)


def _validated(annotation: Any, value: Any, key: str) -> Any:
    if annotation is Any or value is None and _optional(annotation):
        return value
    adapter = _ADAPTERS.get(annotation)
    if adapter is None:
        adapter = _ADAPTERS[annotation] = TypeAdapter(annotation, config=_LAX)
    try:
        validated = adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"not allowed; allowed: {err['ctx']['expected']}"
        raise SettingsError(f"{key}: {msg} (got {value!r})") from None
    # Keep list-typed inputs for tuple fields as the dataclass expects them.
    return validated


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


__all__ = ["Registry", "UnknownName", "SettingsError", "build_settings", "setting_defaults"]
