"""The oracle's settings: a typed model loaded from YAML, one-line errors naming the key.

    host: 127.0.0.1          # interface to bind
    port: 8765
    db: oracle.sqlite        # the SQLite store (created when missing)
    backend: sface-bf16      # a face-recognition backend from the embedder registry (sface: the
                             # onnxruntime reference; sface-bf16: the same model, 4x faster)
    aligner: resize          # how request images become the backend's input crops
    max_body_bytes: 8388608  # larger request bodies: 413
    max_batch: 64            # more images in one request: 413
    max_pixels: 16777216     # a larger decoded image (width x height): 413
    rate_per_second: 10      # per key, token bucket (burst = max(1, rate)); over it: 429
    query_budget: null       # images a query key may have scored in all; null = unlimited
    threads: 2               # requests embedded at once
    defenses: {}             # score defenses, all off by default; see fl_sim.oracle_defenses:
                             # face_gate, detector, noise, rounding, decision, identity_budget
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fl_sim.oracle_defenses import OracleDefenses


class OracleSettingsError(ValueError):
    """A bad oracle setting: one line naming the key and what is allowed."""


class OracleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    db: str = "oracle.sqlite"
    backend: str = "sface-bf16"
    aligner: str = "resize"
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_batch: int = Field(64, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1)
    rate_per_second: float = Field(10.0, gt=0)
    query_budget: int | None = Field(None, ge=0)
    threads: int = Field(2, ge=1, le=64)
    defenses: OracleDefenses = Field(default_factory=OracleDefenses)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from fl_sim.faces import EMBEDDERS

        EMBEDDERS.get(v)  # UnknownName, a ValueError naming the allowed backends
        return v

    @field_validator("aligner")
    @classmethod
    def _known_aligner(cls, v: str) -> str:
        from server.oracle.images import ALIGNERS

        ALIGNERS.get(v)  # UnknownName, a ValueError naming the allowed aligners
        return v


def parse_settings(tree: dict[str, Any] | None, **overrides: Any) -> OracleSettings:
    """Settings from a mapping (a YAML document) and non-None overrides (CLI flags)."""
    tree = dict(tree or {})
    tree.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return OracleSettings.model_validate(tree)
    except ValidationError as exc:
        raise OracleSettingsError(describe_error(exc)) from None


def load_settings(path: str | Path | None = None, **overrides: Any) -> OracleSettings:
    """Settings from a YAML file (None: all defaults), then the overrides."""
    from fl_sim.config import ConfigError, read_yaml_mapping

    try:
        tree = read_yaml_mapping(path, "oracle settings file") if path is not None else {}
    except ConfigError as exc:
        raise OracleSettingsError(str(exc)) from None
    return parse_settings(tree, **overrides)


def describe_error(exc: ValidationError) -> str:
    """The first error as one line: `oracle.key: what is wrong (got ...)`."""
    err = exc.errors()[0]
    key = "oracle." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "oracle"
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}; allowed keys: {', '.join(_allowed_keys(err['loc']))}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {err.get('input')!r})"


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys allowed beside the unknown one at `loc` (nested sections included)."""
    model: type[BaseModel] = OracleSettings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        kinds = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        inner = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if inner is None:
            return list(model.model_fields)
        model = inner
    return list(model.model_fields)


__all__ = ["OracleSettings", "OracleSettingsError", "load_settings", "parse_settings"]
