"""Optax optimisation: AdamW with linear warm-up + cosine decay and global-norm clipping, and the filter that
decides what trains (everything but the MoE router in full SFT; only LoRA adapters in LoRA runs). The filter is
the only thing that freezes the router: what it leaves out is never differentiated."""

from __future__ import annotations

import dataclasses

import optax
from flax import nnx

from diffusion_gemma.model.moe import ROUTER_PARAMS


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Reference recipe (docs/TRAINING.md §8): AdamW 1.5e-4, betas 0.95/0.99, eps 1e-8, wd 1e-4, clip 1.0, 25 warm-up
    steps from 0, cosine to 1.5e-5."""

    learning_rate: float = 1.5e-4
    end_learning_rate: float = 1.5e-5
    warmup_steps: int = 25
    b1: float = 0.95
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 1e-4
    clip_norm: float | None = 1.0

    def __post_init__(self):
        for name in ("learning_rate", "eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optimizer.{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to `end_learning_rate` at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
                                              decay_steps=max(total_steps, warmup + 1),
                                              end_value=config.end_learning_rate)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay))
    return optax.chain(*parts)


def trainable_filter(lora: bool, freeze_router: bool = True) -> nnx.filterlib.Filter:
    """LoRA runs train only `nnx.LoRAParam`s (adapters on the router too, when it is a target); full SFT trains
    every `nnx.Param` except (by default) the router. Buffers such as `layer_scalar` are never trained."""
    if lora:
        return nnx.LoRAParam
    if not freeze_router:
        return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), *[nnx.Not(nnx.PathContains(name)) for name in ROUTER_PARAMS])
