"""HuggingFace DiffusionGemma checkpoints <-> our NNX model, in memory (the streaming converter in
`streaming.py` / `export.py` builds on the same key table).

`load_hf` reads one tensor at a time and places it on its device(s) right away: optionally sharded over a
mesh by the parameters' logical axes, with stacked layer parameters filled in place one layer at a time, so
the host never holds more than one tensor.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_gemma.checkpoints.hf_config import model_config_from_hf_dir
from diffusion_gemma.checkpoints.hf_keys import is_text_key, tensor_mappings
from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError, SafetensorsDir
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.model.transformer import DiffusionGemma


def _flat_variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {path: variable for path, variable in nnx.iter_graph(model) if isinstance(variable, nnx.Variable)}


def check_text_keys(config: ModelConfig, available: set[str], source: str, is_text=is_text_key) -> None:
    """Every text tensor present, nothing unexpected among the keys `is_text` claims; errors name the keys."""
    expected = {m.hf_key for m in tensor_mappings(config)}
    missing = sorted(expected - available)
    unexpected = sorted(k for k in available - expected if is_text(k))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


@functools.partial(jax.jit, donate_argnums=0)
def _set_repeat(stacked: jax.Array, value: jax.Array, repeat: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), repeat, 0)


def _slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked array (its leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def load_hf(hf_dir: str, dtype: str = "float32", compute_dtype: str | None = None, *,
            mesh: jax.sharding.Mesh | None = None, **config_overrides) -> DiffusionGemma:
    """Read a HuggingFace DiffusionGemma directory (single or sharded safetensors) into a new model.

    `dtype` is the parameter dtype; the compute dtype defaults to it. With `mesh`, every parameter is placed
    straight into its sharding (`diffusion_gemma.sharding` rules), tensor by tensor. The vision tower is ignored
    here (the converter carries it through).
    """
    config = model_config_from_hf_dir(hf_dir, param_dtype=dtype, dtype=compute_dtype or dtype, **config_overrides)
    param_dtype = np.dtype(jnp.dtype(dtype))
    with SafetensorsDir(hf_dir) as checkpoint:
        check_text_keys(config, set(checkpoint.keys()), hf_dir)
        model = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
        variables = _flat_variables(model)
        shardings = {}
        if mesh is not None:
            from diffusion_gemma import sharding as sharding_lib

            shardings = {path: variable.get_value()
                         for path, variable in nnx.to_flat_state(sharding_lib.state_shardings(model, mesh))}
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        values: dict[tuple, jax.Array] = {}
        for mapping in tensor_mappings(config):
            tensor = checkpoint.read(mapping.hf_key)
            if tuple(tensor.shape) != mapping.hf_shape:
                raise CheckpointError(f"{checkpoint.key_to_file[mapping.hf_key]}: tensor {mapping.hf_key!r} has shape "
                                      f"{tuple(tensor.shape)}, expected {mapping.hf_shape}")
            value = mapping.to_ours(tensor).astype(param_dtype)
            sharding = shardings.get(mapping.path, default)
            if mapping.repeat is None:
                values[mapping.path] = jax.device_put(value, sharding)
                continue
            if mapping.path not in values:
                values[mapping.path] = jnp.zeros(variables[mapping.path].shape, param_dtype, device=sharding)
            values[mapping.path] = _set_repeat(values[mapping.path], jax.device_put(value, _slice_sharding(sharding)),
                                               jnp.int32(mapping.repeat))
    for path, variable in variables.items():
        variable.set_value(values[path])
    return model


def hf_text_tensors(model: DiffusionGemma) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) for every text tensor of `model`, one at a time, in HF layout and the parameter dtype."""
    variables = _flat_variables(model)
    for mapping in tensor_mappings(model.config):
        value = variables[mapping.path].get_value()
        if mapping.repeat is not None:
            value = value[mapping.repeat]
        yield mapping.hf_key, mapping.to_hf(np.asarray(jax.device_get(value)))
