"""Attach LoRA adapters to a model's kernels (see `diffusion_gemma.model.lora` for the convention); folding
them back in is `diffusion_gemma.checkpoints.orbax_io.merge_adapters`, shared by loading and export.

Targets are named `module.kernel` relative to a layer (`attn.q_proj`, `mlp.down_proj`, `moe.gate_up_proj`, ...)
or `self_conditioning.<kernel>` for the self-conditioning MLP. Expert targets are grouped per expert (the expert
axis is a batch axis of the adapter), so they shard with the experts under expert parallelism.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma.model.lora import LoRA

# (module attribute inside a layer, kernel name) -> (batch_dims, in_dims) of the UNSTACKED kernel.
LAYER_TARGETS = {
    "attn.q_proj": (0, 1), "attn.k_proj": (0, 1), "attn.v_proj": (0, 1), "attn.o_proj": (0, 2),
    "mlp.gate_proj": (0, 1), "mlp.up_proj": (0, 1), "mlp.down_proj": (0, 1),
    "moe.router_proj": (0, 1), "moe.gate_up_proj": (1, 1), "moe.down_proj": (1, 1),
}
SELF_CONDITIONING_TARGETS = {"self_conditioning.gate_proj": (0, 1), "self_conditioning.up_proj": (0, 1),
                             "self_conditioning.down_proj": (0, 1)}
ATTENTION = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERTS = ("moe.gate_up_proj", "moe.down_proj")
# The NeMo reference recipe (docs/TRAINING.md §7) and the "all linear" recipe (everything but the experts).
REFERENCE_TARGETS = ATTENTION + DENSE_MLP
ALL_LINEAR_TARGETS = ATTENTION + DENSE_MLP + ("moe.router_proj",) + tuple(SELF_CONDITIONING_TARGETS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = REFERENCE_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        valid = set(LAYER_TARGETS) | set(SELF_CONDITIONING_TARGETS)
        unknown = sorted(set(self.targets) - valid)
        if unknown:
            raise ValueError(f"lora.targets {unknown} are not LoRA targets; valid: {sorted(valid)}")


def _resolve(root: nnx.Module, dotted: str) -> tuple[nnx.Module, str]:
    *modules, kernel = dotted.split(".")
    for name in modules:
        root = getattr(root, name)
    return root, kernel


def apply_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> int:
    """Attach `<kernel>_lora` adapters in place; returns how many kernels were adapted. Stacked layers get
    adapters stacked the same way (one independent adapter per layer)."""
    count = 0
    for target in config.targets:
        if target in SELF_CONDITIONING_TARGETS:
            module, kernel = _resolve(model, target.replace("self_conditioning.", "self_conditioning.mlp."))
            batch_dims, in_dims = SELF_CONDITIONING_TARGETS[target]
            shape = getattr(module, kernel).shape
            setattr(module, f"{kernel}_lora", LoRA(shape, batch_dims=batch_dims, in_dims=in_dims, rank=config.rank,
                                                   alpha=config.alpha, rngs=rngs))
            count += 1
            continue
        batch_dims, in_dims = LAYER_TARGETS[target]
        for block in model.blocks:
            module, kernel = _resolve(block, target)
            if getattr(module, kernel, None) is None:  # e.g. v_proj on full-attention layers (k is v)
                continue
            repeats, *shape = getattr(module, kernel).shape
            copies = [LoRA(tuple(shape), batch_dims=batch_dims, in_dims=in_dims, rank=config.rank,
                           alpha=config.alpha, rngs=rngs) for _ in range(repeats)]
            graphdef, _ = nnx.split(copies[0])
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(c) for c in copies])
            setattr(module, f"{kernel}_lora", nnx.merge(graphdef, stacked))
            count += repeats
    return count

