"""The toolkit's programs lowered from shapes alone, on any devices (compile-only TPU devices included).

`train_step` lowers exactly what the trainer jits (`training.setup.build` + `training.step.jit_train_step`: the
same model, sharding rules, remat policy, LoRA adapters, frozen router, gradient accumulation and optimizer
state), with the batch the data pipeline yields (`data.pipeline.batch_shapes`) split over the mesh as the trainer
splits it. `sampler_steps` lowers the sampler's two kinds of model call: encoding the prompt into the KV cache,
and one denoising forward of a canvas against it (the decoder pass that every sampler step runs). Nothing is
allocated: parameters and optimizer moments are `jax.ShapeDtypeStruct`s carrying their shardings.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_gemma import sharding
from diffusion_gemma.data import pipeline
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.training import metrics, setup, step
from diffusion_gemma.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class LoweredProgram:
    """A lowered program and what the report needs beside its executable: the model FLOPs of one call (all
    devices together, the analytic count) and the tokens it processes."""

    name: str
    lowered: Any  # jax.stages.Lowered
    model_flops: float
    tokens: int
    description: str
    compiled: Any = None  # set when building the program already had to compile it
    compiled_in_s: float = 0.0  # ... and how long that took
    expert_flops: float = 0.0  # the routed experts' share of model_flops

    def compile(self):
        return self.compiled if self.compiled is not None else self.lowered.compile()


def mesh_for(config: TrainConfig, devices: list) -> jax.sharding.Mesh:
    """The run's mesh over `devices`, checked before any tracing: an expert-parallel MoE needs whole experts
    per device of the 'expert' axis."""
    mesh = sharding.make_mesh(config.mesh, devices)
    model_config = setup.model_config_for(config)
    if model_config.moe_impl.startswith("expert_parallel"):
        sharding.check_expert_split(model_config.num_experts, dict(mesh.shape))
    return mesh


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _batch_struct(mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """A [B, ...] input split over the mesh's batch axes, as `step.global_batch` places the trainer's batch."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, sharding.batch_spec(mesh, shape)))


def train_step(config: TrainConfig, devices: list) -> LoweredProgram:
    """The trainer's step for `config` on `devices`, lowered."""
    mesh = mesh_for(config, devices)
    built = setup.build(config, mesh, abstract=True)
    state = built.state
    batch = {name: _batch_struct(mesh, shape, dtype)
             for name, (shape, dtype) in pipeline.batch_shapes(config.data).items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=_replicated(mesh))
    step_number = jax.ShapeDtypeStruct((), jnp.int32, sharding=_replicated(mesh))
    with jax.set_mesh(mesh):
        lowered = step.jit_train_step(built).lower(state.trainable, state.rest, state.opt_state, batch, rng,
                                                   step_number)
    data = config.data
    tokens = data.global_batch_size * (data.seq_length + data.block_size)
    flops = tokens * metrics.train_flops_per_token(built.model_config, prompt_tokens=data.seq_length,
                                                   canvas_tokens=data.block_size, lora=config.lora.enabled)
    mode = "LoRA" if config.lora.enabled else "full SFT"
    return LoweredProgram("train_step", lowered, flops, tokens,
                          f"train step ({mode}), global batch {data.global_batch_size}, sequence {data.seq_length} "
                          f"+ canvas {data.block_size}, grad accumulation {config.grad_accum_steps}",
                          expert_flops=flops * _expert_share(built.model_config))


def _expert_share(model_config) -> float:
    return metrics.expert_params_per_token(model_config) / metrics.active_params_per_token(model_config)


def serving_model_config(config: TrainConfig):
    """The sampler's model: the run's architecture with its weights held in the compute dtype (how a
    checkpoint is served), no remat (nothing is differentiated) and no LoRA (merged into the weights)."""
    model_config = setup.model_config_for(config)
    return model_config.replace(param_dtype=model_config.dtype, remat="none")


def sampler_steps(config: TrainConfig, devices: list, *, batch_size: int, prompt_length: int
                  ) -> tuple[LoweredProgram, LoweredProgram]:
    """(encode, denoise): encoding `prompt_length` tokens of `batch_size` rows into a fresh KV cache, and one
    denoising forward of a canvas against that cache with self-conditioning logits, lowered."""
    mesh = mesh_for(config, devices)
    model_config = serving_model_config(config)
    with jax.set_mesh(mesh):
        model = setup.abstract_model(
            lambda: sharding.init_sharded(lambda: DiffusionGemma(model_config, rngs=nnx.Rngs(0)), mesh), mesh)
        graphdef, state = nnx.split(model)
        canvas = model_config.canvas_length

        def encode(state, prompt_ids):
            return nnx.merge(graphdef, state).encode(prompt_ids)[0]

        def denoise(state, canvas_ids, cache, self_conditioning_logits):
            return nnx.merge(graphdef, state).decode(canvas_ids, cache,
                                                     self_conditioning_logits=self_conditioning_logits)

        prompt = _batch_struct(mesh, (batch_size, prompt_length), jnp.int32)
        encoded = jax.jit(encode).lower(state, prompt)
        # The cache enters the denoising forward as the encoder left it: the shardings XLA chose for it.
        began = time.perf_counter()
        encode_compiled = encoded.compile()
        encode_s = time.perf_counter() - began
        cache = jax.tree.map(lambda shape, placement: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                                                           sharding=placement),
                             encoded.out_info, encode_compiled.output_shardings)
        canvas_ids = _batch_struct(mesh, (batch_size, canvas), jnp.int32)
        logits = _batch_struct(mesh, (batch_size, canvas, model_config.vocab_size), model_config.param_dtype)
        denoised = jax.jit(denoise).lower(state, canvas_ids, cache, logits)
    active, share = metrics.active_params_per_token(model_config), _expert_share(model_config)
    encode_flops, denoise_flops = 2 * active * batch_size * prompt_length, 2 * active * batch_size * canvas
    return (LoweredProgram("encode", encoded, encode_flops, batch_size * prompt_length,
                           f"sampler encode, batch {batch_size}, prompt {prompt_length}", encode_compiled,
                           compiled_in_s=encode_s, expert_flops=encode_flops * share),
            LoweredProgram("denoise", denoised, denoise_flops, batch_size * canvas,
                           f"sampler denoising forward, batch {batch_size}, canvas {canvas} against a "
                           f"{prompt_length}-token cache", expert_flops=denoise_flops * share))
