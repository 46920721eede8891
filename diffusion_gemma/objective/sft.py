"""The SFT objective: corrupt -> encode -> pass 1 -> pass 2 -> losses (docs/TRAINING.md).

Three entry points for the trainer, all pure functions of (graphdef, params, ...) so they can be jitted and
differentiated with `jax.grad(..., argnums=1)`:
  * `loss_fn` — the whole global batch at once: (total, metric sums).
  * `loss_counts` + `micro_batch_loss_fn` — gradient accumulation: the counts are model-free, so compute them
    for the global batch first; each micro-batch's loss is then its sums divided by the GLOBAL counts, and the
    micro-batch losses (and gradients) add up exactly to those of the whole batch.
  * `loss_sums` — the raw (sum, count) pairs, for trainers that prefer to divide at the end.
Metrics are (sum, count) pairs too (see `losses.finalize_metrics`).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma.config import ModelConfig
from diffusion_gemma.objective import batching, losses, randomness
from diffusion_gemma.objective.batching import Canvas, SftBatch
from diffusion_gemma.objective.corruption import Corruption, CorruptionSettings, corrupt
from diffusion_gemma.objective.self_conditioning import sample_coins, two_pass_logits
from diffusion_gemma.model.transformer import DiffusionGemma, KVCache

SELECTED_BLOCK = "selected_block"
FULL_RESPONSE = "full_response"
AR_SEQUENCE = "sequence"
AR_RESPONSE = "response"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveSettings:
    """Static settings of the objective (hashable: pass them as a static jit argument).

    `canvas`: SELECTED_BLOCK trains on the chosen block only; FULL_RESPONSE runs every response block as the
    reference does (the oracle; same loss and gradients, more compute). What trains is the caller's choice: the
    gradient is taken w.r.t. `params` only (the trainer leaves the MoE router out of them,
    `diffusion_gemma.training.optimizer.trainable_filter`). `ar_targets`: AR_SEQUENCE predicts every next token
    of prompt and response (the reference), AR_RESPONSE only the supervised ones (a prompt the model never has to
    write, e.g. a puzzle whose blanks are arbitrary, then costs no AR capacity).
    """

    block_size: int = 256
    corruption: CorruptionSettings = CorruptionSettings()
    self_conditioning_probability: float = 0.5
    ar_weight: float = 1.0
    ar_per_example: bool = False
    ar_targets: str = AR_SEQUENCE
    num_rate_buckets: int = 4
    canvas: str = SELECTED_BLOCK

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"ObjectiveSettings.block_size must be positive, got {self.block_size}")
        if not 0.0 <= self.self_conditioning_probability <= 1.0:
            raise ValueError("ObjectiveSettings.self_conditioning_probability must be in [0, 1], got "
                             f"{self.self_conditioning_probability}")
        if self.num_rate_buckets <= 0:
            raise ValueError(f"ObjectiveSettings.num_rate_buckets must be positive, got {self.num_rate_buckets}")
        if self.canvas not in (SELECTED_BLOCK, FULL_RESPONSE):
            raise ValueError(f"ObjectiveSettings.canvas = {self.canvas!r}; expected {SELECTED_BLOCK!r} or "
                             f"{FULL_RESPONSE!r}")
        if self.ar_targets not in (AR_SEQUENCE, AR_RESPONSE):
            raise ValueError(f"ObjectiveSettings.ar_targets = {self.ar_targets!r}; expected {AR_SEQUENCE!r} or "
                             f"{AR_RESPONSE!r}")

    def ar_target_mask(self, batch: SftBatch) -> jax.Array | None:
        """[B, S] tokens the AR loss predicts (None: every real one)."""
        return batch.supervised_mask if self.ar_targets == AR_RESPONSE else None


@flax.struct.dataclass
class LossCounts:
    """Denominators: scored canvas tokens, and AR pairs (token mean) or examples with a pair (per-example mean)."""

    diffusion: jax.Array
    ar: jax.Array


@flax.struct.dataclass
class LossSums:
    """Unnormalised loss terms and the counts they sum over; add them over micro-batches, then `total`."""

    diffusion: jax.Array
    ar: jax.Array
    counts: LossCounts

    def total(self, ar_weight: float, counts: LossCounts | None = None) -> jax.Array:
        """diffusion / counts.diffusion + ar_weight * ar / counts.ar (own counts unless global ones are given)."""
        counts = self.counts if counts is None else counts
        return (losses.mean_of((self.diffusion, counts.diffusion))
                + ar_weight * losses.mean_of((self.ar, counts.ar)))


@flax.struct.dataclass
class Forward:
    """What one training forward computes: the canvas, pass 2's canvas logits [B, C, V], the encoder's
    final-normed hidden states [B, S, D], the corruption and the self-conditioning coins [B]."""

    canvas: Canvas
    canvas_logits: jax.Array
    encoder_hidden: jax.Array
    corruption: Corruption
    coins: jax.Array


def prepare_canvas(batch: SftBatch, rng: jax.Array, settings: ObjectiveSettings,
                   config: ModelConfig) -> tuple[Corruption, Canvas, jax.Array]:
    """Model-free part: per-example keys [B], corruption of the whole row, block choice, canvas gathering."""
    keys = randomness.example_keys(rng, batch.example_index)
    corruption = corrupt(batch.input_ids, batch.supervised_mask, keys, vocab_size=config.vocab_size,
                         settings=settings.corruption, clamped_mask=batch.clamped_mask)
    chosen = batching.choose_blocks(batch.denoised_mask, batch.response_start, keys, settings.block_size)
    build = (batching.selected_block_canvas if settings.canvas == SELECTED_BLOCK
             else batching.full_response_canvas)
    canvas = build(batch, corruption, chosen, block_size=settings.block_size,
                   sliding_window=config.sliding_window, pad_token_id=config.pad_token_id)
    return corruption, canvas, keys


def denoise_canvas(model: DiffusionGemma, cache: KVCache, canvas: Canvas, coins: jax.Array,
                   settings: ObjectiveSettings) -> jax.Array:
    """Denoise `canvas` against the encoder `cache` under its training visibility -> pass 2 logits [B, C, V]
    (a single pass when self-conditioning is off: a False coin gives exactly the no-self-conditioning input)."""

    def decode(self_conditioning_logits, self_conditioning_mask):
        return model.decode(canvas.noised_ids, cache, canvas.positions, self_conditioning_logits,
                            self_conditioning_mask, canvas.visibility)

    if settings.self_conditioning_probability == 0.0:
        return decode(None, None)
    return two_pass_logits(decode, coins)


def forward(model: DiffusionGemma, batch: SftBatch, rng: jax.Array, settings: ObjectiveSettings) -> Forward:
    """Encode the clean sequence (not detached: the diffusion loss trains the encoder pass too), then denoise
    the canvas against it with two-pass self-conditioning. Clamped positions are clean in the canvas of both
    passes and unscored; the encoder (and its AR loss) sees the clean row either way."""
    corruption, canvas, keys = prepare_canvas(batch, rng, settings, model.config)
    cache, encoder_hidden = model.encode(batch.input_ids, padding_mask=batch.attention_mask.astype(bool))
    coins = sample_coins(keys, settings.self_conditioning_probability)
    return Forward(canvas=canvas, canvas_logits=denoise_canvas(model, cache, canvas, coins, settings),
                   encoder_hidden=encoder_hidden, corruption=corruption, coins=coins)


def loss_counts(batch: SftBatch, rng: jax.Array, settings: ObjectiveSettings) -> LossCounts:
    """The denominators of `batch`'s loss, without running the model (they depend on the data and keys only)."""
    keys = randomness.example_keys(rng, batch.example_index)
    chosen = batching.choose_blocks(batch.denoised_mask, batch.response_start, keys, settings.block_size)
    per_block = batching.supervised_tokens_per_block(batch.denoised_mask, batch.response_start,
                                                     settings.block_size)
    diffusion = jnp.sum(jnp.take_along_axis(per_block, chosen[:, None], axis=1), dtype=jnp.int32)
    pairs = losses.next_token_pairs(batch.attention_mask, settings.ar_target_mask(batch))
    ar = jnp.sum(pairs.any(axis=1) if settings.ar_per_example else pairs, dtype=jnp.int32)
    return LossCounts(diffusion=diffusion, ar=ar if settings.ar_weight != 0.0 else jnp.zeros_like(ar))


def _per_example_sum(values: jax.Array) -> losses.SumAndCount:
    """values [B] -> (sum, B): a per-example mean that adds up over micro-batches."""
    return jnp.sum(values), jnp.asarray(values.shape[0], jnp.int32)


def model_loss_sums(model: DiffusionGemma, batch: SftBatch, rng: jax.Array,
                    settings: ObjectiveSettings) -> tuple[LossSums, dict[str, losses.SumAndCount]]:
    """(LossSums, metric sums) of one (micro-)batch for an NNX model."""
    out = forward(model, batch, rng, settings)
    canvas = out.canvas
    token_losses = losses.token_cross_entropy(out.canvas_logits, canvas.clean_ids)               # [B, C]
    diffusion = losses.masked_sum(token_losses, canvas.scored_mask)
    metrics = {
        "diffusion_loss": diffusion,
        "accuracy_corrupted": losses.accuracy_sums(out.canvas_logits, canvas.clean_ids,
                                                   canvas.scored_mask & canvas.noise_mask),
        "accuracy_clean": losses.accuracy_sums(out.canvas_logits, canvas.clean_ids,
                                               canvas.scored_mask & ~canvas.noise_mask),
        "corruption_rate": _per_example_sum(out.corruption.rate),
        "self_conditioning_rate": _per_example_sum(out.coins.astype(jnp.float32)),
    }
    bucket_sums, bucket_counts = losses.rate_bucket_sums(token_losses, canvas.scored_mask, out.corruption.rate,
                                                         settings.num_rate_buckets)
    for bucket in range(settings.num_rate_buckets):
        low, high = bucket / settings.num_rate_buckets, (bucket + 1) / settings.num_rate_buckets
        metrics[f"diffusion_loss_t{low:.2f}_{high:.2f}"] = (bucket_sums[bucket], bucket_counts[bucket])

    if settings.ar_weight != 0.0:
        encoder_logits = model.lm_logits(out.encoder_hidden[:, :-1])                            # [B, S-1, V]
        ar = losses.next_token_loss_sums(encoder_logits, batch.input_ids, batch.attention_mask,
                                         per_example=settings.ar_per_example,
                                         target_mask=settings.ar_target_mask(batch))
        metrics["ar_loss"] = ar
    else:
        ar = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    sums = LossSums(diffusion=diffusion[0], ar=ar[0], counts=LossCounts(diffusion=diffusion[1], ar=ar[1]))
    return sums, metrics


def loss_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: SftBatch, rng: jax.Array,
              settings: ObjectiveSettings,
              frozen_state: nnx.State | None = None) -> tuple[LossSums, dict[str, losses.SumAndCount]]:
    """`model_loss_sums` on the model `nnx.merge(graphdef, params, frozen_state)`. `params` is what gets
    differentiated (the trainable parameters); `frozen_state` the rest (the frozen router, buffers such as
    layer_scalar)."""
    states = (params,) if frozen_state is None else (params, frozen_state)
    return model_loss_sums(nnx.merge(graphdef, *states), batch, rng, settings)


def micro_batch_loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: SftBatch, rng: jax.Array,
                        settings: ObjectiveSettings, global_counts: LossCounts,
                        frozen_state: nnx.State | None = None) -> tuple[jax.Array, dict[str, losses.SumAndCount]]:
    """This micro-batch's share of the global loss: its sums over `global_counts` (from `loss_counts` on the
    global batch). Summing the returned losses, gradients and metrics over micro-batches gives the global ones."""
    sums, metrics = loss_sums(graphdef, params, batch, rng, settings, frozen_state)
    return sums.total(settings.ar_weight, global_counts), metrics


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: SftBatch, rng: jax.Array,
            settings: ObjectiveSettings,
            frozen_state: nnx.State | None = None) -> tuple[jax.Array, dict[str, losses.SumAndCount]]:
    """Total loss of a whole global batch: diffusion + ar_weight * AR, each normalised by this batch's counts.

    `rng` is the base key; each example's randomness is `fold_in(rng, batch.example_index[b])`.
    """
    sums, metrics = loss_sums(graphdef, params, batch, rng, settings, frozen_state)
    return sums.total(settings.ar_weight), metrics
