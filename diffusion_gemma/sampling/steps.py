"""The math of one block-diffusion sampling step, as pure functions (no model, no loop state).

Each function mirrors one piece of transformers' `DiffusionGemmaForBlockDiffusion.generate` (docs/SAMPLING.md) in the
exact arithmetic form the reference uses, so the jitted sampler (`sampler.py`) agrees with it token for token:
the temperature of a step, the per-position entropy, the entropy-bound acceptance, the stable-and-confident stop
rule and the EOS/pad post-processing of a finished canvas. The other acceptance rules offered by the sampler
(confidence threshold, top-k, top-two margin) and the categorical draw live here too.

Shapes: B batch rows, C canvas positions, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------- temperature
def temperature_schedule(t_min: float, t_max: float, num_steps: int) -> np.ndarray:
    """Temperatures [N] of steps taken 0..N-1 (steps remaining N..1): `t_min + (t_max - t_min) * (step / N)`.

    Computed on the host in float32 exactly as the reference evaluates it (`step / N` in fp32, the Python-float
    difference `t_max - t_min` rounded to fp32, then fp32 multiply and add), so the division `logits / T` sees
    the very same divisor. The first step uses t_max; t_min is never reached.
    """
    remaining = np.arange(num_steps, 0, -1, dtype=np.int32)
    fraction = remaining.astype(np.float32) / np.float32(num_steps)
    return np.float32(t_min) + np.float32(t_max - t_min) * fraction


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """`logits / temperature` as a true IEEE division, as the reference computes it.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which differs in the
    last bit for some elements; dividing by a full-shape operand hidden behind an optimization barrier keeps the
    division (XLA still fuses the broadcast, so nothing [B, C, V]-sized is materialised).
    """
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(temperature.astype(logits.dtype), logits.shape))
    return logits / divisor


# ------------------------------------------------------------------------------------------------ entropy
def token_entropy(scaled_logits: jax.Array) -> jax.Array:
    """[B, C, V] -> [B, C] entropy of softmax(scaled_logits), in the arithmetic of
    `torch.distributions.Categorical(logits=...).entropy()`: log-probs are `x - logsumexp(x)` with the
    log-sum-exp rounded first (for a near one-hot row this quantises the top log-prob to the ulp of the max,
    which moves small entropies by ~1e-7, so the form matters), probabilities are softmax of those log-probs, and
    log-probs are clamped to the most negative finite float so that 0 * -inf contributes 0."""
    x = scaled_logits.astype(jnp.float32)
    peak = jnp.max(x, axis=-1, keepdims=True)
    log_sum_exp = jnp.log(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True)) + peak
    log_probs = x - log_sum_exp
    probs = jax.nn.softmax(log_probs, axis=-1)
    clamped = jnp.maximum(log_probs, jnp.finfo(jnp.float32).min)
    return -jnp.sum(clamped * probs, axis=-1)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's error-free sum: a + b == s + err exactly."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    return s, (a - a_virtual) + (b - b_virtual)


def cumsum_wide_accumulator(x: jax.Array, axis: int = -1) -> jax.Array:
    """Inclusive float32 cumulative sum accumulated in ~double precision and rounded once per output.

    torch's CPU `cumsum` of a float32 tensor accumulates in float64; a plain fp32 scan drifts from it by a few
    ulps. A double-float (hi, lo) associative scan reproduces the wide accumulator in log depth on any backend.
    """
    def combine(left, right):
        hi, lo = _two_sum(left[0], right[0])
        lo = lo + (left[1] + right[1])
        total = hi + lo
        return total, lo - (total - hi)

    x = x.astype(jnp.float32)
    hi, _ = jax.lax.associative_scan(combine, (x, jnp.zeros_like(x)), axis=axis)
    return hi


# ---------------------------------------------------------------------------------------------- acceptance
def entropy_bound_acceptance(entropy: jax.Array, bound: float | jax.Array) -> jax.Array:
    """[B, C] entropies -> bool [B, C]: the reference's EntropyBoundSampler rule (arXiv:2505.24857).

    Positions sorted by ascending entropy; sorted position j is accepted iff
    `cumsum(sorted)[j] - sorted[j] <= bound`, evaluated in exactly that form (the lowest-entropy position is
    always accepted). The left side bounds the mutual information among the accepted tokens.
    """
    order = jnp.argsort(entropy, axis=-1)
    sorted_entropy = jnp.take_along_axis(entropy, order, axis=-1)
    cumulative = cumsum_wide_accumulator(sorted_entropy, axis=-1)
    sorted_accept = cumulative - sorted_entropy <= bound
    return jnp.take_along_axis(sorted_accept, jnp.argsort(order, axis=-1), axis=-1)


def confidence_acceptance(confidence: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """[B, C] probabilities of the drawn tokens -> bool [B, C]: accept every position at least `threshold`
    confident, and always the single most confident one so each step makes progress (Fast-dLLM's
    threshold-parallel rule, arXiv:2505.22618)."""
    most_confident = jnp.arange(confidence.shape[-1]) == jnp.argmax(confidence, axis=-1)[:, None]
    return (confidence >= threshold) | most_confident


def top_k_acceptance(confidence: jax.Array, k: int) -> jax.Array:
    """[B, C] -> bool [B, C]: accept the k most confident positions of every row (LLaDA / Fast-dLLM top-k)."""
    rank = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)
    return rank < k


def top_two_margin(probs: jax.Array) -> jax.Array:
    """[B, C, V] probabilities -> [B, C]: the largest minus the second-largest probability of each position
    (0 when two tokens tie for the top, 1 for a one-hot row). Two reductions instead of a top-k over V: the
    top entry is masked out by its argmax index, so a tie keeps its twin as the runner-up."""
    probs = probs.astype(jnp.float32)
    top = jnp.argmax(probs, axis=-1)
    first = jnp.take_along_axis(probs, top[..., None], axis=-1)[..., 0]
    others = jnp.where(jnp.arange(probs.shape[-1]) == top[..., None], -jnp.inf, probs)
    return first - jnp.max(others, axis=-1)


def margin_acceptance(margin: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """[B, C] top-two margins -> bool [B, C]: accept every position whose margin is >= `threshold`, and always
    the one with the largest margin (the first of equal ones), so each step makes progress.

    The top-probability-margin order of Kim et al. (ICML 2025, "Train for the worst, plan for the best"): commit
    first the positions where the model is least torn between two tokens. The top probability alone cannot tell
    a position split between two candidates (0.5 / 0.45) from one whose runner-up is far behind (0.5 / 0.05);
    the margin can. With threshold 1 only the largest margin is accepted, and the positions whose margin rounds
    to 1 in float32 (a runner-up below ~6e-8): the strict largest-first order.
    """
    largest = jnp.arange(margin.shape[-1]) == jnp.argmax(margin, axis=-1)[:, None]
    return (margin >= threshold) | largest


# ------------------------------------------------------------------------------------------------ sampling
def _block_size(vocab_size: int) -> int:
    return max(1, 1 << int(math.log2(max(1.0, math.sqrt(vocab_size)))))


def _last_positive(mass: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis (0 if none)."""
    width = mass.shape[-1]
    return width - 1 - jnp.argmax(jnp.flip(mass > 0, axis=-1), axis=-1)


def sample_from_uniform(probs: jax.Array, uniform: jax.Array, block_size: int | None = None) -> jax.Array:
    """Inverse-CDF categorical draw: probs [..., V] (need not sum to 1), uniform [...] in [0, 1) -> int32 [...]:
    the first token whose cumulative probability exceeds `uniform * total`.

    One uniform per position instead of V Gumbel variates (generating those dominated a CPU step), and a
    two-level search: block masses [V / b] -> the block holding the target -> a cumulative sum over that block
    only, so the work per draw is one pass over V plus O(sqrt V). Rounding never selects a zero-probability token.
    """
    *lead, vocab = probs.shape
    size = block_size or _block_size(vocab)
    num_blocks = -(-vocab // size)
    probs = probs.astype(jnp.float32)
    if num_blocks * size != vocab:
        probs = jnp.pad(probs, [(0, 0)] * len(lead) + [(0, num_blocks * size - vocab)])
    blocks = probs.reshape(*lead, num_blocks, size)
    mass = jnp.sum(blocks, axis=-1)                                            # [..., nb]
    block_cdf = jnp.cumsum(mass, axis=-1)
    target = uniform.astype(jnp.float32) * block_cdf[..., -1]
    block = jnp.sum(block_cdf <= target[..., None], axis=-1)
    block = jnp.minimum(block, _last_positive(mass))
    before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[..., None], -1)[..., 0],
                       0.0)
    chosen = jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]  # [..., b]
    within_cdf = jnp.cumsum(chosen, axis=-1)
    index = jnp.sum(within_cdf <= (target - before)[..., None], axis=-1)
    index = jnp.minimum(index, _last_positive(chosen))
    return (block * size + index).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- stop rule
def stable_and_confident(history: jax.Array, argmax_canvas: jax.Array, mean_entropy: jax.Array,
                         stability_threshold: int | jax.Array,
                         confidence_threshold: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference's StableAndConfidentStoppingCriteria for one step.

    history [H, B, C] holds the argmax canvases of the last H steps, oldest first (-1 before a block's first
    steps), H >= stability_threshold = K. Stable: the new argmax canvas equals each of the newest K (always, when
    K = 0; a larger H only lets several thresholds share one compiled program). Confident: the mean per-position
    entropy of the temperature-scaled logits is below `confidence_threshold`.
    Returns (stop [B], history with the new canvas appended and the oldest dropped).
    """
    capacity = history.shape[0]
    ignored = jnp.arange(capacity) < capacity - stability_threshold
    stable = jnp.all((history == argmax_canvas[None]) | ignored[:, None, None], axis=(0, 2))
    history = jnp.concatenate([history[1:], argmax_canvas[None]], axis=0)[-capacity:] if capacity else history
    return stable & (mean_entropy < confidence_threshold), history


# ------------------------------------------------------------------------------------------ canvas finalize
def finalize_canvas(canvas: jax.Array, finished: jax.Array, eos_ids: jax.Array, pad_id: int | jax.Array | None,
                    use_pad: bool | jax.Array = True) -> tuple[jax.Array, jax.Array]:
    """EOS/pad post-processing of a new argmax canvas [B, C] given rows `finished` [B] in earlier blocks.

    A row whose canvas holds an EOS id is finished. With a pad id (`pad_id` not None and `use_pad`): tokens after
    a row's first EOS become pad and rows finished earlier get a fully padded canvas; without one, canvases are
    kept as generated. eos_ids [E] (entries < 0 never match; may be empty). Returns (canvas, finished).
    """
    is_eos = jnp.any(canvas[..., None] == eos_ids, axis=-1) if eos_ids.shape[0] else jnp.zeros(canvas.shape, bool)
    now_finished = finished | jnp.any(is_eos, axis=-1)
    if pad_id is None:
        return canvas, now_finished
    eos_before = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32) > 0
    to_pad = (finished[:, None] | eos_before) & use_pad
    return jnp.where(to_pad, jnp.asarray(pad_id, canvas.dtype), canvas), now_finished


def tokens_per_forward(generated: np.ndarray, decoder_passes: np.ndarray, pad_id: int | None) -> np.ndarray:
    """Non-pad generated tokens [B, G] / decoder passes [B] of each row (the field's secondary metric)."""
    generated = np.asarray(generated)
    valid = generated.shape[1] if pad_id is None else np.sum(generated != pad_id, axis=-1)
    return np.asarray(valid, np.float32) / np.asarray(decoder_passes, np.float32)
