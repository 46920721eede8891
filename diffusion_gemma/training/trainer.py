"""The SFT trainer: `train(config, workdir)`, the one library function the CLI and notebooks call. It wires
three modules, each usable on its own: `setup` (mesh -> model, random init born sharded or imported HF / Orbax
weights [-> LoRA adapters] -> optimizer -> state, restored from the latest checkpoint), `step` (the jitted step:
objective over micro-batches with global-count normalisation -> gradients -> optax) and `loop` (the steps and
their hooks: console bar, JSONL and TensorBoard metrics, periodic evaluation, Orbax checkpoints of the state,
step and data iterator every N steps, every M minutes and when SIGTERM or Ctrl-C stops the run).

A resumed run reproduces the uninterrupted run's losses exactly: every example's randomness is keyed by its
global index in the data stream, and the iterator state is checkpointed; what the interrupted run logged after
its checkpoint is dropped, so metrics.jsonl keeps one line per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import flax
import jax
import optax
from absl import logging

from diffusion_gemma import sharding
from diffusion_gemma.data import pipeline
from diffusion_gemma.training import evaluation, loop, metrics as metrics_lib, setup, step as step_lib
from diffusion_gemma.training.config import TrainConfig
from diffusion_gemma.training.setup import TrainingError

__all__ = ["TrainResult", "TrainingError", "train"]


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


def train(config: TrainConfig, workdir: str, *, stop_after: int | None = None, progress: bool = True,
          devices: list | None = None) -> TrainResult:
    """Train until `config.num_steps` (or `stop_after` more steps, for tests and drills), resuming from the
    latest checkpoint in `workdir/checkpoints` if there is one. `devices` (default: all) span the mesh."""
    _check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh, devices)
    logging.info("mesh %s over %d device(s); jax %s, flax %s, optax %s", dict(mesh.shape), mesh.size,
                 jax.__version__, flax.__version__, optax.__version__)
    tokenizer = setup.tokenizer_for(config)
    source = pipeline.make_source(config.data, tokenizer)
    evaluator = evaluation.make_evaluator(config.evaluation, config.data, tokenizer, workdir)
    built = setup.build(config, mesh)
    with jax.set_mesh(mesh), contextlib.ExitStack() as cleanup:
        checkpointer = setup.checkpointer(config, workdir, built, tokenizer)
        cleanup.callback(checkpointer.close)
        checkpointer.check_free_space(built.state.trainable, built.state.rest, built.state.opt_state)
        data_iterator = iter(pipeline.make_dataset(source, config.data, num_steps=config.num_steps, rows=sharding.
                                                   process_batch_rows(mesh, config.data.global_batch_size)))
        state, start_step = setup.restore_latest(checkpointer, built.state, data_iterator)
        end_step = config.num_steps if stop_after is None else min(config.num_steps, start_step + stop_after)
        console = loop.Console(progress)
        if start_step:
            console.say(f"resuming from step {start_step} of {end_step} ({checkpointer.directory})")
        logger = _metrics_logger(workdir, start_step, console)
        cleanup.callback(logger.close)
        evaluate = (None if evaluator is None
                    else loop.PeriodicEvaluation(evaluator, config.evaluation.every_steps, mesh))
        outcome = loop.run(
            step_lib.jit_train_step(built), state,
            lambda: step_lib.global_batch(next(data_iterator), mesh, config.data.global_batch_size),
            jax.random.key(config.seed), start_step=start_step, end_step=end_step, log_every=config.log_every,
            throughput=_throughput(config, built), logger=logger, evaluation=evaluate,
            checkpoints=loop.Checkpoints(checkpointer, config.checkpoint, data_iterator), console=console)
    return TrainResult(steps_run=outcome.step - start_step, final_step=outcome.step,
                       losses=[record["loss"] for record in outcome.history], history=outcome.history,
                       target_step=end_step, stop_reason=outcome.stop_reason)


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


def _metrics_logger(workdir: str, start_step: int, console: loop.Console) -> metrics_lib.MetricsLogger:
    """The metrics log without what an interrupted run logged after the checkpoint this one resumes from (and
    likewise the samples evaluation's texts): those steps are logged again."""
    logger = metrics_lib.MetricsLogger(workdir, resume_step=start_step)
    if logger.dropped:
        console.say(f"metrics.jsonl: dropped {logger.dropped} line(s) that the interrupted run logged after step "
                    f"{start_step}")
    if jax.process_index() == 0:
        metrics_lib.drop_lines_after(os.path.join(workdir, evaluation.SAMPLES_FILE), start_step)
    return logger


def _throughput(config: TrainConfig, built: setup.TrainSetup) -> loop.Throughput:
    return loop.Throughput(
        tokens_per_step=config.data.global_batch_size * (config.data.seq_length + config.data.block_size),
        flops_per_token=metrics_lib.train_flops_per_token(built.model_config, prompt_tokens=config.data.seq_length,
                                                          canvas_tokens=config.data.block_size,
                                                          lora=config.lora.enabled),
        peak_flops=metrics_lib.device_peak_flops())
