"""Load a model to evaluate, wherever it comes from: a HuggingFace directory, one of our Orbax checkpoints, or a
training workdir's `checkpoints/` (latest step), LoRA adapters included.

Evaluation runs the plain model on one device: adapters are merged into their kernels (W + scale * a @ b, as
the model's `effective_kernel` computes it), and an expert-parallel MoE (which needs a mesh) is swapped for an
implementation that gives the same outputs without one.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data.tokenizer import find_tokenizer_file
from diffusion_gemma.model.lora import lora_delta
from diffusion_gemma.model.transformer import DiffusionGemma

SINGLE_DEVICE_MOE = "grouped"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """model; tokenizer: the tokenizer file shipped with the weights (the HF directory's, or the checkpoint's
    `hf/` passthrough), None when there is none; merged_adapters: how many LoRA adapters were folded in."""

    model: DiffusionGemma
    tokenizer: str | None
    merged_adapters: int = 0


def load(*, checkpoint: str | None = None, hf_dir: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Exactly one of `checkpoint` (ours, or a CheckpointManager root) and `hf_dir`; parameters in `dtype`."""
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of checkpoint and hf_dir")
    if hf_dir is not None:
        from diffusion_gemma.checkpoints.hf import load_hf

        model = load_hf(hf_dir, dtype=dtype, moe_impl=SINGLE_DEVICE_MOE, moe_capacity_factor=None)
        return LoadedModel(model, find_tokenizer_file(hf_dir) if os.path.isdir(hf_dir) else None)
    ckpt = orbax_io.locate(checkpoint)
    model, merged = _load_checkpoint(ckpt, dtype)
    side = ckpt.find(orbax_io.HF_SUBDIR)
    return LoadedModel(model, find_tokenizer_file(side) if side else None, merged)


def single_device_config(config: ModelConfig, dtype: str) -> ModelConfig:
    moe = config.moe_impl if not config.moe_impl.startswith("expert_parallel") else SINGLE_DEVICE_MOE
    return config.replace(param_dtype=dtype, dtype=dtype, moe_impl=moe, moe_capacity_factor=None, remat="none")


def _load_checkpoint(ckpt: orbax_io.CheckpointDir, dtype: str) -> tuple[DiffusionGemma, int]:
    config = single_device_config(orbax_io.read_model_config(ckpt), dtype)
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    stored = orbax_io.ParamReader(ckpt.params).shapes()
    orbax_io.check_leaves({p: tuple(v.shape) for p, v in orbax_io.model_variables(abstract).items()}, stored,
                          ckpt.params)
    values = orbax_io.flatten(orbax_io.restore_params(ckpt.step_dir))
    merged = merge_adapters(values, orbax_io.read_lora(ckpt), where=ckpt.params)
    graphdef, state = nnx.split(abstract)
    flat = [(path, variable.replace(jnp.asarray(values[tuple(str(p) for p in path)], dtype)))
            for path, variable in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), merged


def merge_adapters(values: dict, lora: dict, *, where: str) -> int:
    """Fold every `<kernel>_lora/{a,b}` of a flat {path: array} tree into its kernel, in place (the adapter
    leaves are removed); the scale comes from lora.json. Returns the number of adapters merged."""
    adapters = sorted({path[:-1] for path in values if orbax_io.is_lora_path(path)})
    for adapter in adapters:
        name = orbax_io.path_key(adapter)
        kernel_path = orbax_io.lora_kernel_path(adapter)
        if kernel_path not in values or adapter + ("a",) not in values or adapter + ("b",) not in values:
            raise CheckpointError(f"{where}: adapter {name!r} needs its 'a', 'b' and the kernel "
                                  f"{orbax_io.path_key(kernel_path)!r}")
        meta = lora.get(name)
        if not meta or "scale" not in meta:
            raise CheckpointError(f"{where}: no scale recorded for adapter {name!r} (expected in "
                                  f"{orbax_io.LORA_FILE})")
        kernel = values[kernel_path]
        a, b = values.pop(adapter + ("a",)), values.pop(adapter + ("b",))
        # Stacked layers carry one more leading batch axis than lora.json's per-layer batch_dims.
        batch_dims = a.ndim + b.ndim - 2 - kernel.ndim
        delta = lora_delta(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), float(meta["scale"]),
                           batch_dims)
        if tuple(delta.shape) != tuple(kernel.shape):
            raise CheckpointError(f"{where}: adapter {name!r} gives a delta of shape {tuple(delta.shape)}, its "
                                  f"kernel is {tuple(kernel.shape)}")
        values[kernel_path] = np.asarray(jnp.asarray(kernel) + delta.astype(kernel.dtype))
    return len(adapters)
