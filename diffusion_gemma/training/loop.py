"""The training loop and its hooks, each usable on its own: the console (status lines and the progress bar),
throughput metrics, periodic evaluation, the checkpoint schedule (steps and wall clock), and the stop signals
(SIGTERM, Ctrl-C) that end a run early with a checkpoint at the step reached. Every process runs the same loop
and takes every decision at the same step as the others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from diffusion_gemma import distributed
from diffusion_gemma.data import pipeline
from diffusion_gemma.training import checkpointing
from diffusion_gemma.training.config import CheckpointSection
from diffusion_gemma.training.metrics import MetricsLogger
from diffusion_gemma.training.setup import TrainingError, TrainState


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


class Checkpoints:
    """Saves the state and the data iterator's position when the schedule, the last step or a stop asks."""

    def __init__(self, checkpointer: checkpointing.TrainCheckpointer, section: CheckpointSection, data_iterator):
        self.checkpointer, self._section, self._data_iterator = checkpointer, section, data_iterator
        self._schedule: SaveSchedule | None = None

    def start(self) -> None:
        """Start the schedule's clock (after compilation)."""
        self._schedule = SaveSchedule(self._section)

    def save_if_due(self, step: int, state: TrainState, *, force: bool) -> None:
        if not (self._schedule.due(step) or force):
            return
        # force=True: the schedule has decided, Orbax's own interval must not second-guess it.
        self.checkpointer.save(step, params=(state.trainable, state.rest), opt_state=state.opt_state,
                               train_state={"step": step,
                                            "data_iterator": pipeline.iterator_state_json(self._data_iterator)},
                               force=True)
        self._schedule.saved()


class Console:
    """Process 0's status lines and progress bar; nothing elsewhere or when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and jax.process_index() == 0
        self.bar: tqdm | None = None

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def start_bar(self, start_step: int, end_step: int) -> None:
        self.bar = tqdm(total=end_step, initial=start_step, disable=not self.enabled, desc="train", unit="step",
                        dynamic_ncols=True)

    def stepped(self, values: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")

    def evaluating(self, step: int) -> None:
        self.bar.set_description_str(f"evaluating at step {step}")

    def evaluated(self, step: int, values: dict[str, float] | None) -> None:
        self.bar.set_description_str("train", refresh=False)
        self.bar.unpause()  # the evaluation's time is not the steps' rate
        if values is not None:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()
                                                        if "/" not in k.removeprefix("eval/")))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Step time, tokens per second and (on an accelerator with a known peak) model FLOP utilisation."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None

    def measure(self, seconds: float) -> dict[str, float]:
        values = {"step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds}
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * self.tokens_per_step / seconds / self.peak_flops
        return values


@dataclasses.dataclass(frozen=True)
class PeriodicEvaluation:
    """The evaluator (`training.evaluation`) every `every_steps` steps and at the last one."""

    evaluator: Callable
    every_steps: int
    mesh: jax.sharding.Mesh

    def due(self, step: int, end_step: int) -> bool:
        return step % self.every_steps == 0 or step == end_step

    def __call__(self, model: nnx.Module, step: int, should_stop: Callable[[], bool]) -> dict[str, float] | None:
        """The values, prefixed `eval/`; None if a stop abandoned the evaluation. It runs in a helper thread
        (`distributed.run_interruptibly`), so that a signal reaches `should_stop` within a denoising step."""
        def run():
            with jax.set_mesh(self.mesh):  # the mesh context is per thread
                return self.evaluator(model, step, should_stop)

        values = distributed.run_interruptibly(run)
        return None if values is None else {f"eval/{name}": float(value) for name, value in values.items()}


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    step: int
    history: list[dict[str, float]]
    stop_reason: str | None


def _take_step(step_fn: Callable, state: TrainState, batch: Any, rng: jax.Array, step: int,
               checkpoint_directory: str) -> tuple[TrainState, dict[str, float], float]:
    """One step -> (the new state, its metrics on the host, its wall time)."""
    began = time.perf_counter()
    trainable, opt_state, metrics = step_fn(state.trainable, state.rest, state.opt_state, batch, rng,
                                            jnp.asarray(step, jnp.int32))
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    seconds = time.perf_counter() - began
    if not math.isfinite(values["loss"]):
        raise TrainingError(f"non-finite loss {values['loss']} at step {step + 1}; stopping. The last good "
                            f"checkpoint in {checkpoint_directory} is kept.")
    return dataclasses.replace(state, trainable=trainable, opt_state=opt_state), values, seconds


def run(step_fn: Callable, state: TrainState, next_batch: Callable[[], Any], rng: jax.Array, *, start_step: int,
        end_step: int, log_every: int, throughput: Throughput, logger: MetricsLogger,
        evaluation: PeriodicEvaluation | None, checkpoints: Checkpoints, console: Console) -> LoopResult:
    """Steps from `start_step` to `end_step`, or until SIGTERM / Ctrl-C: then the evaluation under way is
    abandoned, and the step reached is logged and checkpointed. `step_fn` is `step.jit_train_step`'s;
    `next_batch()` gives the next global batch."""
    history: list[dict[str, float]] = []
    step, stop_reason, batch = start_step, None, None
    try:
        with distributed.StopSignal() as stop:
            if step < end_step:
                # Compiled before the bar starts its clock (a first "step" of minutes would wreck its ETA) and,
                # with several processes, on all of them before the first collective.
                batch = next_batch()
                began = time.perf_counter()
                console.say("compiling the train step ...")
                step_fn = distributed.compile_together(step_fn, state.trainable, state.rest, state.opt_state, batch,
                                                       rng, jnp.asarray(step, jnp.int32))
                console.say(f"train step compiled in {time.perf_counter() - began:.1f} s")
            console.start_bar(start_step, end_step)
            checkpoints.start()
            while step < end_step:
                state, values, seconds = _take_step(step_fn, state, next_batch() if batch is None else batch, rng,
                                                    step, checkpoints.checkpointer.directory)
                batch = None
                step += 1
                values.update(throughput.measure(seconds))
                history.append({"step": step, **values})
                console.stepped(values)
                # SIGTERM / Ctrl-C: every process stops at the same check (one per step, one per eval batch).
                stopping = stop.check()
                record = values if step % log_every == 0 or step == end_step else {}
                if evaluation is not None and not stopping and evaluation.due(step, end_step):
                    console.evaluating(step)
                    eval_values = evaluation(state.model(), step, stop.check)
                    console.evaluated(step, eval_values)
                    if eval_values is None:  # abandoned for a stop
                        stopping = True
                    else:
                        history[-1].update(eval_values)
                        record = {**record, **eval_values}
                if record:
                    logger.write(step, record)  # one line per step, evaluation included
                if stopping:
                    stop_reason = stop.reason
                    console.close()  # its last rate and ETA are the training's, not the save's
                    again = " (Ctrl-C again aborts without saving)" if stop_reason == "SIGINT" else ""
                    console.say(f"{stop_reason}: stopping at step {step} of {end_step}, saving a checkpoint{again}")
                checkpoints.save_if_due(step, state, force=step == end_step or stopping)
                if stopping:
                    break
    finally:
        console.close()
    return LoopResult(state=state, step=step, history=history, stop_reason=stop_reason)
