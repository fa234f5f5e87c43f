"""The experiment config: typed, validated, with one-line errors that name the key.

A config is YAML (see configs/). `key.sub=value` overrides from the command line are
applied before validation. Anything unknown or out of range is a `ConfigError` whose
message names the key and what is allowed; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    name: str = "orl"
    image_size: int = Field(64, ge=16, le=512)
    root: str | None = None
    download: bool = False
    max_images: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    options: dict[str, float | int | str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from fl_sim.data import DATASETS

        DATASETS.get(v)  # UnknownName, a ValueError naming the allowed data sets
        return v


class PublicDataConfig(DataConfig):
    """The attacker's public face set D_c (disjoint from every client's data)."""

    name: str = "synthetic"
    size: int = Field(100, ge=1)
    test_fraction: float = 0.0


class ModelConfig(Section):
    name: str = "resnet18"
    weights: str | None = None  # a local state_dict file

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from fl_sim.models import MODELS

        MODELS.get(v)  # UnknownName, a ValueError naming the allowed models
        return v


class CentralDPConfig(Section):
    """Central differential privacy by Flower's server-side fixed-clipping wrapper: every
    client's weight update clipped to `clipping_norm` (L2, all arrays together), Gaussian
    noise of std noise_multiplier x clipping_norm / clients_per_round on the average."""

    noise_multiplier: float = Field(1.0, ge=0)
    clipping_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta of the (epsilon, delta) reported


class ServerMomentumConfig(Section):
    """FedAvgM (Hsu et al. 2019): the server steps along a running sum of the rounds' updates,
    v <- momentum * v + d, w <- w - lr * v, where d is the clients' mean gradient (FedSGD) or
    the global weights minus the clients' mean weights (FedAvg's pseudo-gradient). It averages
    the noise of which clients were sampled over about 1 / (1 - momentum) rounds. BatchNorm
    buffers are the clients' mean as without it. On ORL (configs/bench/federation.yaml) it
    closes most of the gap between FedAvg and central training."""

    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class SecureAggregationConfig(Section):
    """Flower's SecAgg+ (Bell et al. 2020): each client masks its quantised update, and the
    server learns the weighted mean of the round's updates and nothing else. The settings are
    the protocol's own (`flwr.server.workflow.SecAggPlusWorkflow`): `num_shares` (an integer
    > 2, or a share of the sampled clients) and `reconstruction_threshold` (an integer, or a
    share of `num_shares`) trade dropout tolerance against privacy; updates are clipped to
    +-`clipping_range` and quantised to `quantization_range` levels (step
    2 x clipping_range / quantization_range, relative to the weight max_weight / examples)."""

    num_shares: int | float = 3
    reconstruction_threshold: int | float = 2
    clipping_range: float = Field(8.0, gt=0)
    quantization_range: int = Field(2**22, gt=0)
    modulus_range: int = Field(2**32, gt=0)
    # The largest weight (examples) a client may report; None: the largest number of images a
    # client trains on in a round, so the quantisation step is as fine as the protocol allows.
    max_weight: float | None = Field(None, gt=0)


class FederationConfig(Section):
    num_clients: int = Field(100, ge=1)
    clients_per_round: int = Field(10, ge=1)
    rounds: int = Field(3, ge=1)
    algorithm: Literal["fedsgd", "fedavg"] = "fedsgd"
    batch_size: int = Field(1, ge=1)  # FedSGD: images in the client's one step; FedAvg: minibatch
    local_lr: float = Field(0.01, gt=0)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1)  # FedAvg: overrides epochs when set
    server_lr: float = Field(0.1, gt=0)  # FedSGD: w <- w - server_lr * mean gradient (server_momentum unset)
    # The server's optimiser (None: FedSGD steps by server_lr, FedAvg takes the clients' mean).
    server_momentum: ServerMomentumConfig | None = None
    partitioning: Literal["iid", "by-identity", "dirichlet"] = "by-identity"
    dirichlet_alpha: float = Field(0.5, gt=0)
    eval_every: int = Field(1, ge=1)
    # Rounds whose global model is kept as models/round-NNN.pt (global_model.pt always holds
    # the latest): checkpoints to attack offline, e.g. `fl-sim bench dfleak model.weights=...`.
    save_rounds: list[int] = Field(default_factory=list)
    # How clients run BatchNorm while training: "train" (batch statistics, the usual) or
    # "eval" (frozen running statistics, e.g. for batch-1 clients). Attack cases record it.
    bn_mode: Literal["train", "eval"] = "train"
    # Where the global model's BatchNorm running statistics come from. "clients": the mean of
    # the clients' (under bn_mode train they move with every batch; under eval they never
    # move: on the start-up statistics the network barely learns, measured at chance after
    # 30 rounds). "public": the server re-estimates them on its public faces
    # (threat.public_data) for the start model and after every round, so clients with
    # bn_mode eval train a normalised network.
    bn_statistics: Literal["clients", "public"] = "clients"
    # Central DP of the released model (None: off). It protects the model against those
    # who see it, not the clients against the server: the curious server reads each update
    # before it is clipped, and the attacks see it so.
    central_dp: CentralDPConfig | None = None
    # Secure aggregation (None: off): the curious server sees only the round's aggregate,
    # and the attacks target it (a batch of every sampled client's images).
    secure_aggregation: SecureAggregationConfig | None = None

    @model_validator(mode="after")
    def _sample_fits(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})"
            )
        if self.central_dp is not None and self.algorithm != "fedavg":
            raise ValueError("central_dp clips the clients' weight updates: it needs algorithm fedavg")
        sa = self.secure_aggregation
        if sa is not None:
            if self.central_dp is not None:
                raise ValueError("central_dp clips each client's update on the server, which secure_aggregation "
                                 "hides from it; use the clients' `gaussian` defense (local DP) instead")
            if self.clients_per_round < 2:
                raise ValueError("secure_aggregation needs at least 2 clients per round: the aggregate of one "
                                 "client is its update")
            if isinstance(sa.num_shares, int) and sa.num_shares > self.clients_per_round:
                raise ValueError(f"secure_aggregation.num_shares ({sa.num_shares}) exceeds clients_per_round "
                                 f"({self.clients_per_round})")
        return self


class VictimConfig(Section):
    mode: Literal["sampled", "explicit", "all"] = "sampled"
    k: int = Field(4, ge=1)  # sampled: victims per attacked round, among that round's clients
    ids: list[int] = Field(default_factory=list)  # explicit: partition ids (the evaluation victims)
    # Development victims: the ones settings are chosen on by looking at reconstructions.
    # Benchmarks tune on these and report on `ids`; the two sets never overlap.
    dev_ids: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dev_and_eval_disjoint(self) -> "VictimConfig":
        shared = sorted(set(self.ids) & set(self.dev_ids))
        if shared:
            raise ValueError(f"ids and dev_ids must be disjoint (evaluation victims are never tuning "
                             f"victims); both hold {shared}")
        return self


class ThreatConfig(Section):
    victims: VictimConfig = Field(default_factory=VictimConfig)
    rounds: list[int] = Field(default_factory=lambda: [1])
    labels_known: bool = False  # do clients send their labels with the update?
    public_data: PublicDataConfig = Field(default_factory=PublicDataConfig)
    save_cases: bool = False  # also write each victim's case (and its truth) under cases/ for offline attacks


class AttackConfig(Section):
    name: str
    label: str | None = None  # how it is listed in results; defaults to name
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


class DefenseConfig(Section):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class EngineConfig(Section):
    backend: Literal["ray", "inprocess"] = "ray"
    ray_address: str | None = None  # join an existing Ray cluster ("auto" or host:port)
    client_num_cpus: float = Field(1.0, gt=0)
    # In-process: clients trained at once, in threads (None: this machine's CPUs divided by
    # client_num_cpus, as Ray would place actors; always 1 under SecAgg+ or on a GPU).
    inprocess_workers: int | None = Field(None, ge=1)
    client_num_gpus: float = Field(0.0, ge=0)
    attack_parallelism: int = Field(1, ge=1)  # attacks run at once (Ray tasks when > 1)
    # In-process, attack a round's victims as one batch with each gradient-matching attack
    # (attacks/multi.py: 2-3x the victim-iterations per second; results within ~0.2 dB of
    # attacking each alone). GGL (its own CMA-ES loop in latent space) goes one by one.
    attack_together: bool = True


class MetricsConfig(Section):
    lpips: bool = True
    id_backend: Literal["facenet", "sface"] | None = "facenet"
    # The attack every other attack is compared with, victim by victim (paired differences
    # with confidence intervals in the report); None: the first configured attack.
    reference: str | None = None


class ExperimentConfig(Section):
    name: str = "experiment"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    attacks: list[AttackConfig] = Field(default_factory=list)
    defenses: list[DefenseConfig] = Field(default_factory=list)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"device {v!r} is not allowed; allowed: cpu, cuda, cuda:N")
        return v

    @model_validator(mode="after")
    def _unique_attack_labels(self) -> "ExperimentConfig":
        keys = [a.key for a in self.attacks]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"attack labels must be unique; repeated: {', '.join(sorted(dup))} (set `label`)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists...)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, k, keys[: i + 1])]
            continue
        node = node.setdefault(k, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(node, list):
        node[_list_index(node, keys[-1], keys)] = value
    else:
        node[keys[-1]] = value


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {'.'.join(path)}: {key!r} is not an index below {len(node)}")
    return int(key)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file that holds a mapping; anything else is a one-line ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level")
    return tree


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    tree: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    for o in overrides:
        apply_override(tree, o)
    return parse_config(tree)


def parse_config(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None


def describe_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first error as one line: `key: what is wrong; allowed: ...` (keys of `model`,
    the experiment config by default)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model or ExperimentConfig, loc[:-1])
        return f"unknown key {key!r}; allowed keys here: {', '.join(allowed)}"
    if err["type"] == "literal_error":
        return f"{key}: {err['input']!r} is not allowed; allowed: {err['ctx']['expected']}"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{key}: {msg} (got {err.get('input')!r}){more}"


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        sub = _section_type(field.annotation)
        if sub is None:
            break
        model = sub
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_config", "apply_override", "read_yaml_mapping"]
