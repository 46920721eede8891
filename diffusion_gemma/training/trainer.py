"""The SFT loop: one library function, `train(config, workdir)`, that the CLI and notebooks call.

Flow: mesh -> model (random init born sharded, or imported HF / Orbax weights) [-> LoRA adapters] -> grain
pipeline -> jitted step (objective over micro-batches with global-count normalisation -> grads -> optax) ->
metrics (console bar, JSONL, TensorBoard) -> Orbax checkpoints (params, optimizer, step, data iterator) every N
steps, every M minutes and when SIGTERM or Ctrl-C stops the run (`TrainResult.stop_reason`; a periodic
evaluation under way is abandoned). A resumed run reproduces the uninterrupted run's losses exactly: every
example's randomness is keyed by its global index in the data stream, and the iterator state is checkpointed;
what the interrupted run logged after its checkpoint is dropped, so metrics.jsonl keeps one line per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from diffusion_gemma import distributed, registry, sharding
from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data import pipeline
from diffusion_gemma.objective import losses, sft
from diffusion_gemma.objective.batching import SftBatch
from diffusion_gemma.objective.corruption import CorruptionSettings
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.training import checkpointing, evaluation, lora as lora_lib, metrics as metrics_lib
from diffusion_gemma.training import optimizer as opt_lib
from diffusion_gemma.training.config import CheckpointSection, TrainConfig


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    """`target_step` is the step the run was heading for (config.num_steps, or fewer with `stop_after`);
    `stop_reason` is None when it got there, else the signal's name ("SIGTERM", "SIGINT") that stopped it after
    checkpointing `final_step`."""

    steps_run: int
    final_step: int
    losses: list[float]
    history: list[dict[str, float]]
    target_step: int = 0
    stop_reason: str | None = None


# ----------------------------------------------------------------------------------------------- building
def model_config_for(config: TrainConfig) -> ModelConfig:
    section = config.model
    overrides = dict(section.overrides, dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat)
    if section.init_hf_dir:
        return ModelConfig.from_hf_dir(section.init_hf_dir, **overrides)
    if section.init_checkpoint:
        stored = orbax_io.read_model_config(orbax_io.locate(section.init_checkpoint))
        return stored.replace(**overrides)
    return registry.MODEL_PRESETS.get(section.preset, where="model.preset")(**overrides)


def build_model(config: TrainConfig, model_config: ModelConfig, mesh) -> DiffusionGemma:
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
                                       freeze_router=config.freeze_router and not config.lora.enabled)


# ------------------------------------------------------------------------------------------------ the step
def make_train_step(graphdef, trainable_template, rest_template, tx: optax.GradientTransformation,
                    settings: sft.ObjectiveSettings, grad_accum_steps: int,
                    schedule: Callable) -> Callable:
    """(trainable, rest, opt_state, batch, rng, step) -> (trainable, opt_state, metrics). Trees are plain
    nested dicts; `batch` is a dict of [B, ...] arrays. Micro-batches share the GLOBAL token counts, so the
    accumulated loss and gradients equal those of the whole batch at once."""

    def micro_loss(trainable, rest, micro: SftBatch, rng, counts):
        params = checkpointing.tree_to_state(trainable_template, trainable)
        frozen = checkpointing.tree_to_state(rest_template, rest)
        return sft.micro_batch_loss_fn(graphdef, params, micro, rng, settings, counts, frozen)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step_fn(trainable, rest, opt_state, batch, rng, step):
        full = SftBatch(**batch)
        counts = sft.loss_counts(full, rng, settings)
        micro_batches = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), full)

        def accumulate(carry, micro):
            loss_sum, grads_sum, metric_sums = carry
            (loss, metric), grads = grad_fn(trainable, rest, micro, rng, counts)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            metric_sums = jax.tree.map(jnp.add, metric_sums, metric)
            return (loss_sum + loss, grads_sum, metric_sums), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        metric_shapes = jax.eval_shape(lambda: micro_loss(trainable, rest, first, rng, counts)[1])
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (loss, grads, metric_sums), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = losses.finalize_metrics(metric_sums)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(step),
                       scored_tokens=counts.diffusion.astype(jnp.float32))
        return trainable, opt_state, metrics

    return step_fn


# ------------------------------------------------------------------------------------------------- the loop
def _check_workdir(workdir: str) -> None:
    """Fail before any compute when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")  # unique per host
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise TrainingError(f"workdir {workdir} is not writable: {err.strerror or err}") from None


def _tokenizer_for(config: TrainConfig):
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


def train(config: TrainConfig, workdir: str, *, stop_after: int | None = None, progress: bool = True,
          devices: list | None = None) -> TrainResult:
    """Train until `config.num_steps` (or `stop_after` more steps, for tests and drills), resuming from the
    latest checkpoint in `workdir/checkpoints` if there is one. `devices` (default: all) span the mesh."""
    _check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh, devices)
    logging.info("mesh %s over %d device(s); jax %s, flax %s, optax %s", dict(mesh.shape), mesh.size,
                 jax.__version__, flax.__version__, optax.__version__)
    model_config = model_config_for(config)
    settings = objective_settings(config)
    tokenizer = _tokenizer_for(config)
    source = pipeline.make_source(config.data, tokenizer)
    evaluator = evaluation.make_evaluator(config.evaluation, config.data, tokenizer, workdir)

    with jax.set_mesh(mesh):
        model = build_model(config, model_config, mesh)
        lora_meta = orbax_io.lora_metadata(model)
        graphdef, trainable_state, rest_state = nnx.split(
            model, opt_lib.trainable_filter(config.lora.enabled, config.freeze_router), ...)
        trainable = checkpointing.state_to_tree(trainable_state)
        rest = checkpointing.state_to_tree(rest_state)
        trainable_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable_state)
        rest_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest_state)
        schedule = opt_lib.learning_rate_schedule(config.optimizer, config.num_steps)
        tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
        opt_state = jax.jit(tx.init)(trainable)

        checkpointer = checkpointing.TrainCheckpointer(
            os.path.join(workdir, "checkpoints"), model_config=model_config, lora=lora_meta,
            keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
            hf_source=config.model.init_hf_dir or config.model.init_checkpoint, tokenizer=tokenizer)
        checkpointer.check_free_space(trainable, rest, opt_state)
        data_iterator = iter(pipeline.make_dataset(source, config.data, num_steps=config.num_steps, rows=sharding.
                                                   process_batch_rows(mesh, config.data.global_batch_size)))
        start_step = 0
        latest = checkpointer.latest_step()
        if latest is not None:
            params_target = _abstract({**_deep_merge(trainable, rest)})
            opt_target = _abstract(opt_state)
            params, opt_state, train_state = checkpointer.restore(latest, params_target=params_target,
                                                                  opt_state_target=opt_target)
            trainable, rest = _split_like(params, trainable), _split_like(params, rest)
            pipeline.restore_iterator_state(data_iterator, train_state["data_iterator"])
            start_step = int(train_state["step"])

        # Outputs keep the inputs' shardings: otherwise step 2 sees new input shardings and compiles again.
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        step_fn = jax.jit(make_train_step(graphdef, trainable_template, rest_template, tx, settings,
                                          config.grad_accum_steps, schedule), donate_argnums=(0, 2),
                          out_shardings=(shardings(trainable), shardings(opt_state),
                                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        logger = metrics_lib.MetricsLogger(workdir, resume_step=start_step)
        rng = jax.random.key(config.seed)
        end_step = config.num_steps if stop_after is None else min(config.num_steps, start_step + stop_after)
        say = _console(progress)
        if latest is not None:
            say(f"resuming from step {start_step} of {end_step} ({checkpointer.directory})")
        if logger.dropped:
            say(f"metrics.jsonl: dropped {logger.dropped} line(s) that the interrupted run logged after step "
                f"{start_step}")
        if jax.process_index() == 0:  # the samples evaluation's texts, likewise logged again from here on
            metrics_lib.drop_lines_after(os.path.join(workdir, evaluation.SAMPLES_FILE), start_step)
        flops_per_token = metrics_lib.train_flops_per_token(
            model_config, prompt_tokens=config.data.seq_length, canvas_tokens=config.data.block_size,
            lora=config.lora.enabled)
        peak = metrics_lib.device_peak_flops()
        history: list[dict[str, float]] = []
        losses_seen: list[float] = []
        step, stop_reason, bar = start_step, None, None
        try:
            with distributed.StopSignal() as stop:
                batch = None
                if step < end_step:
                    # Compiled before the bar starts its clock (a first "step" of minutes would wreck its ETA)
                    # and, with several processes, on all of them before the first collective.
                    batch = _global_batch(next(data_iterator), mesh, config.data.global_batch_size)
                    began = time.perf_counter()
                    say("compiling the train step ...")
                    step_fn = distributed.compile_together(step_fn, trainable, rest, opt_state, batch, rng,
                                                           jnp.asarray(step, jnp.int32))
                    say(f"train step compiled in {time.perf_counter() - began:.1f} s")
                bar = tqdm(total=end_step, initial=start_step, disable=not progress or jax.process_index() != 0,
                           desc="train", unit="step", dynamic_ncols=True)
                saves = SaveSchedule(config.checkpoint)
                while step < end_step:
                    if batch is None:
                        batch = _global_batch(next(data_iterator), mesh, config.data.global_batch_size)
                    started = time.perf_counter()
                    trainable, opt_state, step_metrics = step_fn(trainable, rest, opt_state, batch, rng,
                                                                 jnp.asarray(step, jnp.int32))
                    batch = None
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    elapsed = time.perf_counter() - started
                    if not math.isfinite(values["loss"]):
                        raise TrainingError(f"non-finite loss {values['loss']} at step {step + 1}; stopping. The "
                                            f"last good checkpoint in {checkpointer.directory} is kept.")
                    step += 1
                    tokens = config.data.global_batch_size * (config.data.seq_length + config.data.block_size)
                    values.update(step_time_s=elapsed, tokens_per_s=tokens / elapsed)
                    if peak:
                        values["mfu"] = flops_per_token * tokens / elapsed / peak
                    losses_seen.append(values["loss"])
                    history.append({"step": step, **values})
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
                    # SIGTERM / Ctrl-C: every process stops at the same check (one per step, one per eval batch).
                    stopping = stop.check()
                    record = values if step % config.log_every == 0 or step == end_step else {}
                    if (evaluator is not None and not stopping
                            and (step % config.evaluation.every_steps == 0 or step == end_step)):
                        bar.set_description_str(f"evaluating at step {step}")
                        eval_values = _evaluate(evaluator, graphdef, trainable_template, rest_template, trainable,
                                                rest, step, stop.check, mesh)
                        bar.set_description_str("train", refresh=False)
                        bar.unpause()  # the evaluation's time is not the steps' rate
                        if eval_values is None:  # abandoned for a stop
                            stopping = True
                        else:
                            history[-1].update(eval_values)
                            record = {**record, **eval_values}
                            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_values.items()
                                                                   if "/" not in k.removeprefix("eval/")))
                    if record:
                        logger.write(step, record)  # one line per step, evaluation included
                    if stopping:
                        stop_reason = stop.reason
                        bar.close()  # its last rate and ETA are the training's, not the save's
                        again = " (Ctrl-C again aborts without saving)" if stop_reason == "SIGINT" else ""
                        say(f"{stop_reason}: stopping at step {step} of {end_step}, saving a checkpoint{again}")
                    if saves.due(step) or step == end_step or stopping:
                        _save(checkpointer, step, trainable, rest, opt_state, data_iterator)
                        saves.saved()
                    if stopping:
                        break
        finally:
            if bar is not None:
                bar.close()
            logger.close()
            checkpointer.close()
    return TrainResult(steps_run=step - start_step, final_step=step, losses=losses_seen, history=history,
                       target_step=end_step, stop_reason=stop_reason)


class SaveSchedule:
    """When to checkpoint: every `every_steps` steps, and whenever `every_minutes` of wall time have passed since
    the last save (or since the schedule began, after compilation). Every process must decide alike, so with
    several processes process 0's clock decides for all: one small broadcast per step, made only when the clock
    is on."""

    def __init__(self, section: CheckpointSection, *, clock: Callable[[], float] = time.monotonic,
                 agree: Callable[[bool], bool] = distributed.agree_with_process_0):
        self._every_steps = section.every_steps
        self._every_s = 60.0 * section.every_minutes
        self._clock, self._agree = clock, agree
        self._last = clock()

    def due(self, step: int) -> bool:
        by_steps = step % self._every_steps == 0
        if not self._every_s:
            return by_steps
        by_clock = self._agree(self._clock() - self._last >= self._every_s)  # on every process, every step
        return by_steps or by_clock

    def saved(self) -> None:
        self._last = self._clock()


def _console(enabled: bool) -> Callable[[str], None]:
    """Process 0's status lines, or nothing."""
    if not enabled or jax.process_index() != 0:
        return lambda text: None
    return lambda text: print(text, flush=True)


def _evaluate(evaluator, graphdef, trainable_template, rest_template, trainable, rest, step: int,
              should_stop: Callable[[], bool], mesh) -> dict | None:
    """Run the evaluator on the current weights (merged into a model without copying them); None if a stop
    abandoned it. It runs in a helper thread (`distributed.run_interruptibly`), so that a signal reaches
    `should_stop` within a denoising step."""
    model = nnx.merge(graphdef, checkpointing.tree_to_state(trainable_template, trainable),
                      checkpointing.tree_to_state(rest_template, rest))

    def run():
        with jax.set_mesh(mesh):  # the mesh context is per thread
            return evaluator(model, step, should_stop)

    values = distributed.run_interruptibly(run)
    return None if values is None else {f"eval/{name}": float(value) for name, value in values.items()}


def _save(checkpointer, step, trainable, rest, opt_state, data_iterator) -> None:
    """`SaveSchedule` decides; force=True keeps Orbax from second-guessing it."""
    checkpointer.save(step, params=_deep_merge(trainable, rest), opt_state=opt_state,
                      train_state={"step": step, "data_iterator": pipeline.iterator_state_json(data_iterator)},
                      force=True)


def _global_batch(host_batch: dict[str, np.ndarray], mesh, batch_size: int) -> dict[str, jax.Array]:
    """Process-local rows (`sharding.process_batch_rows`) -> one global array per feature, split over the mesh's
    batch axes."""
    out = {}
    for name, local in host_batch.items():
        global_shape = (batch_size,) + local.shape[1:]
        spec = sharding.batch_spec(mesh, global_shape)
        out[name] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), local,
                                                           global_shape)
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def _split_like(tree: dict, template: dict) -> dict:
    return {key: _split_like(tree[key], value) if isinstance(value, dict) else tree[key]
            for key, value in template.items()}
