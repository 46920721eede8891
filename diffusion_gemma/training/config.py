"""Typed training configuration. ml_collections lives only at the CLI edge: `from_config_dict` converts a
ConfigDict (or plain dict) once, and any unknown key fails with the list of valid ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from diffusion_gemma import registry
from diffusion_gemma.config import REMAT_POLICIES
from diffusion_gemma.data.pipeline import DataConfig
from diffusion_gemma.sharding import MeshConfig
from diffusion_gemma.training.evaluation import EvaluationConfig
from diffusion_gemma.training.lora import LoraConfig
from diffusion_gemma.training.optimizer import OptimizerConfig

class TrainConfigError(ValueError):
    """An unknown or invalid training-config key; the message names it (and the valid keys)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """`preset` names a registered model preset (`diffusion_gemma.registry.MODEL_PRESETS`: tiny,
    gemma4_26b_a4b, and the tasks' own); `overrides` replaces its fields. `init_hf_dir` starts from a
    HuggingFace checkpoint directory, `init_checkpoint` from one of our Orbax checkpoints."""

    preset: str = "tiny"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    init_hf_dir: str | None = None
    init_checkpoint: str | None = None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise TrainConfigError(f"model.remat = {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.init_hf_dir and self.init_checkpoint:
            raise TrainConfigError("set at most one of model.init_hf_dir and model.init_checkpoint")
        if not (self.init_hf_dir or self.init_checkpoint):
            try:
                registry.MODEL_PRESETS.get(self.preset, where="model.preset")
            except registry.RegistryError as err:
                raise TrainConfigError(str(err)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveSection:
    """The SFT objective's settings (docs/TRAINING.md); the block size is the data's."""

    noise_eps: float = 1e-3
    self_conditioning_probability: float = 0.5
    ar_weight: float = 1.0
    ar_per_example: bool = False
    ar_targets: str = "sequence"  # or "response": the AR loss predicts the response's tokens only

    def __post_init__(self):
        if self.ar_targets not in ("sequence", "response"):
            raise TrainConfigError(f"objective.ar_targets = {self.ar_targets!r}; expected 'sequence' (every next "
                                   "token, the reference) or 'response' (the response's tokens only)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LoraConfig().targets

    def to_lora_config(self) -> LoraConfig | None:
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets)) if self.enabled else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """A checkpoint every `every_steps` steps, and also whenever `every_minutes` of wall time have passed since
    the last one (0 turns the clock off), so that a slow run loses at most that much to a crash. With several
    processes process 0's clock decides for all of them. The newest `keep` are kept."""

    every_steps: int = 100
    every_minutes: float = 10.0
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise TrainConfigError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if not self.every_minutes >= 0:
            raise TrainConfigError(f"checkpoint.every_minutes must be >= 0 (0: no time-based checkpoints), got "
                                   f"{self.every_minutes}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 42
    num_steps: int = 100
    grad_accum_steps: int = 1
    log_every: int = 10
    freeze_router: bool = True
    model: ModelSection = ModelSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraSection = LoraSection()
    data: DataConfig = DataConfig()
    objective: ObjectiveSection = ObjectiveSection()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    evaluation: EvaluationConfig = EvaluationConfig()

    def __post_init__(self):
        if self.num_steps <= 0:
            raise TrainConfigError(f"num_steps must be positive, got {self.num_steps}")
        if self.grad_accum_steps <= 0 or self.data.global_batch_size % self.grad_accum_steps:
            raise TrainConfigError(f"grad_accum_steps = {self.grad_accum_steps} must divide "
                                   f"data.global_batch_size = {self.data.global_batch_size}")


def _to_plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


def _build(cls, values: Mapping[str, Any], where: str):
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TrainConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid keys of "
                               f"'{where or 'config.'}': {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _build(hint, value, f"{where}{name}.")
        elif _is_tuple_hint(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise TrainConfigError(f"{where.rstrip('.') or 'config'}: {err}") from None


def _is_tuple_hint(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_hint(arg) for arg in typing.get_args(hint))
    return origin is tuple


def from_config_dict(config: Any) -> TrainConfig:
    """A ConfigDict / dict -> TrainConfig; unknown keys fail with the valid ones listed."""
    return _build(TrainConfig, _to_plain(config), "")
