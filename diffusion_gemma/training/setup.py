"""Everything a run builds before its first step, each piece a function of the `TrainConfig`, so that benchmarks
and tools build exactly what the trainer trains: the model's config (a registered preset, or the initial weights'
own), the model (born sharded) with its LoRA adapters, the objective's settings, the optimizer, the run's
tokenizer, and the `TrainState` the step updates, restored from the latest checkpoint when a run resumes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_gemma import registry, sharding
from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.checkpoints.hf_config import model_config_from_hf_dir
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data import pipeline
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.objective import sft
from diffusion_gemma.objective.corruption import CorruptionSettings
from diffusion_gemma.training import checkpointing, lora as lora_lib, optimizer as opt_lib
from diffusion_gemma.training.config import TrainConfig


class TrainingError(RuntimeError):
    """The run cannot start or continue (e.g. a non-finite loss); the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ the model
def model_config_for(config: TrainConfig) -> ModelConfig:
    section = config.model
    overrides = dict(section.overrides, dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat)
    if section.init_hf_dir:
        return model_config_from_hf_dir(section.init_hf_dir, **overrides)
    if section.init_checkpoint:
        stored = orbax_io.read_model_config(orbax_io.locate(section.init_checkpoint))
        return stored.replace(**overrides)
    return registry.MODEL_PRESETS.get(section.preset, where="model.preset")(**overrides)


def build_model(config: TrainConfig, model_config: ModelConfig, mesh: Mesh) -> DiffusionGemma:
    """Weights land directly in their shardings: random init inside one jitted initialiser, checkpoints read
    tensor by tensor onto the mesh."""
    if config.model.init_hf_dir:
        from diffusion_gemma.checkpoints.hf import load_hf

        model = load_hf(config.model.init_hf_dir, dtype=model_config.param_dtype, compute_dtype=model_config.dtype,
                        mesh=mesh, **_config_overrides(model_config))
    elif config.model.init_checkpoint:
        model = orbax_io.load_model(config.model.init_checkpoint, mesh=mesh, param_dtype=model_config.param_dtype,
                                    dtype=model_config.dtype)
        model.config = model_config
    else:
        model = sharding.init_sharded(lambda: DiffusionGemma(model_config, rngs=nnx.Rngs(config.seed)), mesh)
    lora_config = config.lora.to_lora_config()
    if lora_config is not None:
        lora_lib.apply_lora(model, lora_config, nnx.Rngs(config.seed + 1))
        sharding.shard_model(model, mesh)
    return model


def _config_overrides(model_config: ModelConfig) -> dict:
    """Every field the config changed on top of the checkpoint's config.json is applied to the loaded model."""
    return {field.name: getattr(model_config, field.name) for field in dataclasses.fields(model_config)
            if field.name not in ("dtype", "param_dtype")}


def objective_settings(config: TrainConfig) -> sft.ObjectiveSettings:
    section = config.objective
    return sft.ObjectiveSettings(block_size=config.data.block_size,
                                 corruption=CorruptionSettings(eps=section.noise_eps),
                                 self_conditioning_probability=section.self_conditioning_probability,
                                 ar_weight=section.ar_weight, ar_per_example=section.ar_per_example,
                                 ar_targets=section.ar_targets)


def tokenizer_for(config: TrainConfig):
    """The run's tokenizer, which its checkpoints carry: the one the data source's own vocabulary defines, else
    data.tokenizer, else the initial weights' own (HF directory or checkpoint) when the data renders text; None
    for data without text (synthetic)."""
    from diffusion_gemma.data.tokenizer import load_tokenizer

    source = registry.DATA_SOURCES.get(config.data.source, where="data.source")
    own = source.own_tokenizer(config.data)
    if own is not None:
        return own
    path = config.data.tokenizer
    if not path and source.renders_text(config.data):
        if config.model.init_hf_dir:
            path = config.model.init_hf_dir
        elif config.model.init_checkpoint:
            path = orbax_io.locate(config.model.init_checkpoint).tokenizer_file()
        if not path:
            raise TrainingError("this data source renders chat text: set data.tokenizer (or start from weights "
                                "that carry one: model.init_hf_dir or model.init_checkpoint)")
    return load_tokenizer(path) if path else None


# ------------------------------------------------------------------------------------------------ the state
def shardings(tree: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every array (or abstract array) of `tree`, on `mesh`."""
    return jax.tree.map(lambda x: NamedSharding(mesh, x.sharding.spec), tree)


def _with_shardings(shapes: Any, placements: Any) -> Any:
    """Abstract arrays: `shapes`' shapes and dtypes, `placements`' shardings."""
    return jax.tree.map(lambda x, placement: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), shapes,
                        placements)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The model split in two: `trainable` (what the optimizer updates, with `opt_state`) and `rest` (frozen: the
    router in full SFT, the base weights under LoRA, buffers such as layer_scalar); `graphdef` merges them back."""

    graphdef: nnx.GraphDef
    trainable: nnx.State
    rest: nnx.State
    opt_state: optax.OptState

    @classmethod
    def create(cls, model: DiffusionGemma, tx: optax.GradientTransformation, trains: nnx.filterlib.Filter,
               mesh: Mesh) -> "TrainState":
        """The optimizer's moments take their parameters' shardings. An abstract model (`nnx.eval_shape`) gives
        an abstract state, to lower the step without allocating anything."""
        graphdef, trainable, rest = nnx.split(model, trains, ...)
        shapes = jax.eval_shape(tx.init, trainable)
        opt_shardings = optax.tree_map_params(tx, lambda _, parameter: parameter, shapes, shardings(trainable, mesh),
                                              transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(trainable)):
            opt_state = _with_shardings(shapes, opt_shardings)
        else:
            opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
        return cls(graphdef=graphdef, trainable=trainable, rest=rest, opt_state=opt_state)

    def model(self) -> DiffusionGemma:
        """The model on the current weights (no copy)."""
        return nnx.merge(self.graphdef, self.trainable, self.rest)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run builds before its first step (`build`); `step.jit_train_step(setup)` is its step."""

    mesh: Mesh
    model_config: ModelConfig
    settings: sft.ObjectiveSettings
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum_steps: int
    state: TrainState
    lora: dict  # the adapters' metadata that checkpoints carry (`orbax_io.lora_metadata`)


def build(config: TrainConfig, mesh: Mesh, *, abstract: bool = False) -> TrainSetup:
    """The model, its optimizer and its state on `mesh`, as `config` says; `abstract`: shapes only."""
    model_config = model_config_for(config)
    with jax.set_mesh(mesh):
        if abstract:  # the initial weights' shapes are their config's: read no tensor
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_hf_dir="",
                                                                           init_checkpoint=""))
        make = lambda: build_model(config, model_config, mesh)  # noqa: E731
        model = abstract_model(make, mesh) if abstract else make()
    # Outside the mesh: optax builds the moments' layout by running `init` eagerly on placeholders, which must
    # not land on the mesh's devices (compile-only ones cannot run anything).
    tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
    state = TrainState.create(model, tx, opt_lib.trainable_filter(config.lora.enabled, config.freeze_router), mesh)
    return TrainSetup(mesh=mesh, model_config=model_config, settings=objective_settings(config), tx=tx,
                      schedule=opt_lib.learning_rate_schedule(config.optimizer, config.num_steps),
                      grad_accum_steps=config.grad_accum_steps, state=state, lora=orbax_io.lora_metadata(model))


def checkpointer(config: TrainConfig, workdir: str, built: TrainSetup, tokenizer) -> checkpointing.TrainCheckpointer:
    """WORKDIR/checkpoints, which keeps the run's model config, adapters, tokenizer and the initial weights'
    passthrough beside the checkpoints."""
    return checkpointing.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"), model_config=built.model_config, lora=built.lora,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
        hf_source=config.model.init_hf_dir or config.model.init_checkpoint, tokenizer=tokenizer)


def abstract_model(make: Callable[[], DiffusionGemma], mesh: Mesh) -> DiffusionGemma:
    """`make()`'s shapes, dtypes and shardings (`nnx.eval_shape` alone drops the shardings)."""
    model = nnx.eval_shape(make)
    nnx.update(model, _with_shardings(nnx.state(model), sharding.state_shardings(model, mesh)))
    return model


def restore_latest(checkpointer: checkpointing.TrainCheckpointer, state: TrainState,
                   data_iterator: Any) -> tuple[TrainState, int]:
    """(`state` as the latest checkpoint left it, its step), the data iterator moved to where it was; (`state`,
    0) when there is no checkpoint yet. The arrays land in `state`'s shardings, whatever mesh saved them."""
    latest = checkpointer.latest_step()
    if latest is None:
        return state, 0
    (trainable, rest), opt_state, train_state = checkpointer.restore(latest, params=(state.trainable, state.rest),
                                                                     opt_state=state.opt_state)
    pipeline.restore_iterator_state(data_iterator, train_state["data_iterator"])
    return dataclasses.replace(state, trainable=trainable, rest=rest, opt_state=opt_state), int(train_state["step"])
