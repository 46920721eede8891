"""The training step: the SFT objective over micro-batches that share the global batch's token counts, their
gradients added up in a `lax.scan`, then the optimizer update. `jit_train_step` jits it as the trainer runs it,
so that a benchmark or an ahead-of-time compile lowers the trainer's own program.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_gemma import sharding
from diffusion_gemma.objective import losses, sft
from diffusion_gemma.objective.batching import SftBatch
from diffusion_gemma.training.setup import TrainSetup, shardings


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, settings: sft.ObjectiveSettings,
                    grad_accum_steps: int, schedule: optax.Schedule) -> Callable:
    """(trainable, rest, opt_state, batch, rng, step) -> (trainable, opt_state, metrics), where `trainable` and
    `rest` are the two parts of the model's state (`TrainState`) and `batch` a dict of [B, ...] arrays.
    Micro-batches share the GLOBAL token counts, so the accumulated loss and gradients equal those of the whole
    batch at once."""

    def micro_loss(trainable, rest, micro: SftBatch, rng, counts):
        return sft.micro_batch_loss_fn(graphdef, trainable, micro, rng, settings, counts, rest)

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


def jit_train_step(setup: TrainSetup):
    """The step of `setup`, jitted as the trainer calls it: the trainable state and the optimizer state donated,
    and returned in their own shardings (otherwise the second step sees new input shardings and compiles
    again); the metrics replicated."""
    state = setup.state
    step_fn = make_train_step(state.graphdef, setup.tx, setup.settings, setup.grad_accum_steps, setup.schedule)
    return jax.jit(step_fn, donate_argnums=(0, 2),
                   out_shardings=(shardings(state.trainable, setup.mesh), shardings(state.opt_state, setup.mesh),
                                  NamedSharding(setup.mesh, PartitionSpec())))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh, batch_size: int) -> dict[str, jax.Array]:
    """Process-local rows (`sharding.process_batch_rows`) -> one global array per feature, split over the mesh's
    batch axes: the step's `batch`."""
    out = {}
    for name, local in host_batch.items():
        global_shape = (batch_size,) + local.shape[1:]
        spec = sharding.batch_spec(mesh, global_shape)
        out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, global_shape)
    return out
