"""Block-diffusion generation, fully jitted: `generate(model, prompt_ids, prompt_mask, rng, config)`.

The algorithm is transformers' `DiffusionGemmaForBlockDiffusion.generate` (docs/SAMPLING.md), reproduced token for
token. A fixed-size cache holds the prompt and every block. Each block of C tokens starts from uniform noise and
is denoised by a `jax.lax.while_loop` of decoder passes that read the cache, until every row is stable and
confident or N steps have run; its argmax canvas (after EOS/pad replacement) is appended and encoded into the
cache at the positions the decoder used. Blocks run in an outer `while_loop` that ends early once every row has
produced an EOS. Per-row `done` / `finished` masks replace the reference's Python-level early exits, and all
shapes are fixed, so one compilation serves every batch of a shape. The prompt is encoded in canvas-sized
chunks by the same encoder call that appends blocks, so the program holds one encoder and one decoder.

Randomness is an input: a key (one stream per row, so a row's draws do not depend on its batch neighbours), or a
`NoiseTape` holding every initial canvas, categorical uniform and renoise canvas explicitly, which is how the
tests replay the reference's draws exactly.

Strategies from the diffusion-LM literature (`SamplerConfig.acceptance`, `greedy`, `early_stop`), with their
trade-offs:
- `entropy_bound` (the default and the reference, arXiv:2505.24857): accept the lowest-entropy positions while
  their summed entropy minus the largest stays <= `entropy_bound`. Adapts the tokens per step to the model's
  certainty and bounds the dependence among tokens committed together; what this model was tuned with.
- `confidence` (Fast-dLLM's threshold rule, arXiv:2505.22618): accept every position whose drawn token has
  probability >= `accept_confidence`, at least the most confident one. Simple and interpretable; a low
  threshold is fast but may commit mutually dependent tokens in one step, the failure the entropy bound guards
  against.
- `top_k` (LLaDA / Fast-dLLM top-k): accept the `accept_top_k` most confident positions (default C / N, so a
  block can be committed within its step budget). Predictable progress per step but blind to how hard the block
  is: slow on easy spans, hasty on hard ones.
- `margin` (Kim et al., ICML 2025): accept every position whose top-two probability margin is >= `accept_margin`,
  at least the largest. Commits first where the model is not torn between two candidates, which the top
  probability alone cannot tell; one more pass over the vocabulary per step, only when selected.
- `early_stop=False` (a fixed step count): every block runs exactly `max_denoising_steps` steps. Deterministic
  latency (benchmarks, serving budgets); spends steps on blocks that converged early.
- `greedy=True`: the argmax instead of a categorical draw. Deterministic given the initial canvases (evaluation,
  debugging); less diverse and more prone to repetition.
All of them are traced values: switching strategy or threshold reuses the compiled program.

Callbacks (`on_step`, `on_canvas`) let a CLI or notebook watch the canvas converge; they run through
`jax.debug.callback`, so when they are None (the default) the compiled loop has no host round trips.
`should_stop` (the trainer's evaluation, which a SIGTERM must interrupt within a step) is asked after every
denoising step whether to give up: a True marks every row done and finished, so both loops end at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from diffusion_gemma.sampling import steps
from diffusion_gemma.model.transformer import DiffusionGemma

ENTROPY_BOUND = "entropy_bound"
CONFIDENCE = "confidence"
TOP_K = "top_k"
MARGIN = "margin"
ACCEPTANCE_RULES = (ENTROPY_BOUND, CONFIDENCE, TOP_K, MARGIN)

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Sampling settings. Defaults are the reference's; `from_generation_config` reads a checkpoint's.

    max_new_tokens: ceil(max_new_tokens / canvas_length) blocks are generated (the output is not truncated).
    max_denoising_steps: N, the step budget of a block. t_min / t_max: the linear temperature schedule
    (t_max at the first step). acceptance / entropy_bound / accept_confidence / accept_top_k / accept_margin:
    which sampled tokens survive a step (module docstring); accept_top_k None means ceil(canvas_length / N).
    greedy: argmax instead of a categorical draw. early_stop: stop a row once stable for `stability_threshold`
    steps and mean entropy < `confidence_threshold` (False: always N steps). eos_token_ids / pad_token_id:
    end-of-sequence handling (none when empty / None, as in the reference).
    """

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    acceptance: str = ENTROPY_BOUND
    entropy_bound: float = 0.1
    accept_confidence: float = 0.9
    accept_top_k: int | None = None
    accept_margin: float = 0.9
    greedy: bool = False
    early_stop: bool = True
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.max_new_tokens <= 0 or self.max_denoising_steps <= 0:
            raise ValueError(f"max_new_tokens and max_denoising_steps must be positive, got {self.max_new_tokens}, "
                             f"{self.max_denoising_steps}")
        if not (0 <= self.t_min <= self.t_max and self.t_max > 0):  # t_min == t_max: one constant temperature
            raise ValueError(f"need 0 <= t_min <= t_max and t_max > 0, got t_min={self.t_min}, t_max={self.t_max}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance = {self.acceptance!r}; expected one of {ACCEPTANCE_RULES}")
        if self.entropy_bound <= 0 or not 0 < self.accept_confidence <= 1 or self.confidence_threshold <= 0:
            raise ValueError("entropy_bound and confidence_threshold must be > 0 and accept_confidence in (0, 1]")
        if not 0 < self.accept_margin <= 1:
            raise ValueError(f"accept_margin must be in (0, 1], got {self.accept_margin}")
        if self.accept_top_k is not None and self.accept_top_k <= 0:
            raise ValueError(f"accept_top_k must be positive, got {self.accept_top_k}")
        if self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {self.stability_threshold}")

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)

    def num_blocks(self, canvas_length: int) -> int:
        return -(-self.max_new_tokens // canvas_length)

    def top_k(self, canvas_length: int) -> int:
        k = self.accept_top_k or math.ceil(canvas_length / self.max_denoising_steps)
        return min(k, canvas_length)

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "SamplerConfig":
        """Settings from a `generation_config.json` (a file, the checkpoint directory holding one, or its dict).

        Fields the file leaves out or sets to null keep the reference's defaults; a missing file in a directory
        gives the defaults. `overrides` are applied last (any SamplerConfig field).
        """
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, GENERATION_CONFIG_FILE)
                if not os.path.exists(path):
                    return cls(**overrides)
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        fields = {}
        for name in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                     "confidence_threshold"):
            if data.get(name) is not None:
                fields[name] = data[name]
        sampler = data.get("sampler_config")
        if isinstance(sampler, Mapping) and sampler.get("entropy_bound") is not None:
            fields["entropy_bound"] = sampler["entropy_bound"]
        eos = data.get("eos_token_id")
        if eos is not None:
            fields["eos_token_ids"] = (eos,) if isinstance(eos, int) else tuple(eos)
        if data.get("pad_token_id") is not None:
            fields["pad_token_id"] = data["pad_token_id"]
        fields.update(overrides)
        return cls(**fields)


@flax.struct.dataclass
class NoiseTape:
    """Every random input of a generation, explicit: initial_canvas [nb, B, C] (block b's starting canvas),
    uniforms [nb, N, B, C] (the categorical draw of step i of block b, by inverse CDF) and renoise [nb, N, B, C]
    (the fresh tokens for positions step i rejects)."""

    initial_canvas: jax.Array
    uniforms: jax.Array
    renoise: jax.Array

    @classmethod
    def draw(cls, rng: jax.Array, *, batch_size: int, num_blocks: int, num_steps: int, canvas_length: int,
             vocab_size: int) -> "NoiseTape":
        """The tape a key would generate: `generate(..., rng)` equals `generate(..., NoiseTape.draw(rng, ...))`."""
        return _draw_tape(_row_keys(rng, batch_size), num_blocks=num_blocks, num_steps=num_steps,
                          canvas_length=canvas_length, vocab_size=vocab_size)


@flax.struct.dataclass
class GenerationResult:
    """tokens [B, S + nb * C]: prompt then every block (blocks never reached hold pad, or 0 without a pad id);
    num_blocks: blocks generated (all rows finished earlier otherwise); decoder_passes [B]: decoder passes each
    row was still denoising for (the reference's count); steps_per_block [nb]: denoising steps each block ran;
    finished [B]: rows that produced an EOS."""

    tokens: jax.Array
    num_blocks: jax.Array
    decoder_passes: jax.Array
    steps_per_block: jax.Array
    finished: jax.Array
    prompt_length: int = flax.struct.field(pytree_node=False)
    canvas_length: int = flax.struct.field(pytree_node=False)
    pad_token_id: int | None = flax.struct.field(pytree_node=False)

    def sequences(self) -> np.ndarray:
        """[B, S + num_blocks * C]: the reference's `sequences` (prompt and generated blocks)."""
        return np.asarray(self.tokens)[:, : self.prompt_length + int(self.num_blocks) * self.canvas_length]

    def generated(self) -> np.ndarray:
        return self.sequences()[:, self.prompt_length:]

    def tokens_per_forward(self) -> np.ndarray:
        return steps.tokens_per_forward(self.generated(), np.asarray(self.decoder_passes), self.pad_token_id)

    def total_steps(self) -> int:
        return int(np.sum(np.asarray(self.steps_per_block)[: int(self.num_blocks)]))


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """After one denoising step: block index, steps_remaining (the reference's `cur_step`, N..1), the canvas fed
    to the next step [B, C], the argmax canvas [B, C], accepted [B, C] and rows done [B] (numpy)."""

    block: int
    steps_remaining: int
    canvas: np.ndarray
    argmax: np.ndarray
    accepted: np.ndarray
    done: np.ndarray


@dataclasses.dataclass(frozen=True)
class CanvasEvent:
    """After a block: its index, the final canvas [B, C] (after EOS/pad replacement) and rows finished [B]."""

    block: int
    canvas: np.ndarray
    finished: np.ndarray


# ---------------------------------------------------------------------------------------------- randomness
def _row_keys(rng: jax.Array, batch_size: int) -> jax.Array:
    """One typed key -> one key per row (fold_in of the row index); B keys are used as given."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch_size))
    if rng.shape != (batch_size,):
        raise ValueError(f"rng must be one key or {batch_size} keys, got shape {rng.shape}")
    return rng


@functools.partial(jax.jit, static_argnames=("num_blocks", "num_steps", "canvas_length", "vocab_size"))
def _draw_tape(row_keys, *, num_blocks, num_steps, canvas_length, vocab_size) -> NoiseTape:
    """Row r, block b: the initial canvas from fold_in(key_r, b, 0), step i's uniforms and renoise tokens from the
    two halves of split(fold_in(key_r, b, i + 1))."""

    def row(key):
        def block(b):
            block_key = jax.random.fold_in(key, b)
            initial = jax.random.randint(jax.random.fold_in(block_key, 0), (canvas_length,), 0, vocab_size)

            def step(i):
                uniform_key, renoise_key = jax.random.split(jax.random.fold_in(block_key, i + 1))
                return (jax.random.uniform(uniform_key, (canvas_length,)),
                        jax.random.randint(renoise_key, (canvas_length,), 0, vocab_size))

            uniforms, renoise = jax.vmap(step)(jnp.arange(num_steps))
            return initial, uniforms, renoise

        return jax.vmap(block)(jnp.arange(num_blocks))

    initial, uniforms, renoise = jax.vmap(row)(row_keys)              # [B, nb, ...]
    return NoiseTape(initial_canvas=jnp.moveaxis(initial, 0, 1).astype(jnp.int32),
                     uniforms=jnp.moveaxis(uniforms, 0, 2),
                     renoise=jnp.moveaxis(renoise, 0, 2).astype(jnp.int32))


# ------------------------------------------------------------------------------------------------ the loop
_ACCEPTANCE_CODE = {ENTROPY_BOUND: 0, CONFIDENCE: 1, TOP_K: 2, MARGIN: 3}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the compiled program depends on (static). Every other setting (strategy, thresholds, temperatures,
    EOS/pad ids) travels as a traced value, so switching strategies never recompiles. Stability histories and
    EOS lists are sized by capacity (unused entries masked) so that small settings share one program."""

    num_blocks: int
    num_steps: int
    history_capacity: int
    eos_capacity: int


def _plan_and_knobs(config: SamplerConfig, canvas_length: int) -> tuple[_Plan, dict[str, jax.Array]]:
    eos = config.eos_token_ids
    plan = _Plan(num_blocks=config.num_blocks(canvas_length), num_steps=config.max_denoising_steps,
                 history_capacity=max(config.stability_threshold, 2), eos_capacity=4 * max(1, -(-len(eos) // 4)))
    knobs = dict(
        temperatures=jnp.asarray(steps.temperature_schedule(config.t_min, config.t_max, plan.num_steps)),
        acceptance=jnp.int32(_ACCEPTANCE_CODE[config.acceptance]),
        entropy_bound=jnp.float32(config.entropy_bound), accept_confidence=jnp.float32(config.accept_confidence),
        top_k=jnp.int32(config.top_k(canvas_length)), accept_margin=jnp.float32(config.accept_margin),
        greedy=jnp.bool_(config.greedy),
        early_stop=jnp.bool_(config.early_stop), stability_threshold=jnp.int32(config.stability_threshold),
        confidence_threshold=jnp.float32(config.confidence_threshold),
        eos_ids=jnp.asarray(list(eos) + [-1] * (plan.eos_capacity - len(eos)), jnp.int32),
        has_pad=jnp.bool_(config.pad_token_id is not None), pad_id=jnp.int32(config.pad_token_id or 0))
    return plan, knobs


def _step_math(logits, uniform, renoise, knobs, clamped=None):
    """Temperature, draw, acceptance and renoise of one step -> (scaled logits, argmax, accepted, next canvas,
    entropy). `clamped` [B, C]: positions left out of the acceptance rule (their entropy then reads 0)."""
    scaled = steps.apply_temperature(logits, knobs["temperatures_now"])
    probs = jax.nn.softmax(scaled, axis=-1)
    argmax = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
    sampled = jnp.where(knobs["greedy"], argmax, steps.sample_from_uniform(probs, uniform))
    entropy = steps.token_entropy(scaled)
    confidence = jnp.take_along_axis(probs, sampled[..., None], axis=-1)[..., 0]
    # The margin costs a pass over the vocabulary: computed only when its rule is the one in use.
    margin = jax.lax.cond(knobs["acceptance"] == _ACCEPTANCE_CODE[MARGIN], steps.top_two_margin,
                          lambda p: jnp.zeros(p.shape[:-1], jnp.float32), probs)
    if clamped is not None:  # no share of the entropy budget; never the most confident / top-k / largest margin
        entropy = jnp.where(clamped, 0.0, entropy)
        confidence, margin = jnp.where(clamped, -1.0, confidence), jnp.where(clamped, -1.0, margin)
    accepted = jax.lax.select_n(knobs["acceptance"],
                                steps.entropy_bound_acceptance(entropy, knobs["entropy_bound"]),
                                steps.confidence_acceptance(confidence, knobs["accept_confidence"]),
                                steps.top_k_acceptance(confidence, knobs["top_k"]),
                                steps.margin_acceptance(margin, knobs["accept_margin"]))
    return scaled, argmax, accepted, jnp.where(accepted, sampled, renoise), entropy


def _denoise_block(model: DiffusionGemma, cache, positions, block, finished, initial_canvas, tape: NoiseTape,
                   knobs, plan: _Plan, on_step, should_stop, clamp=None):
    """One block's denoising loop -> (argmax canvas [B, C], decoder passes [B], steps run). `clamp`: this
    block's slice of `_clamp_arrays` (None: no clamp, the reference's loop untouched)."""
    batch, canvas_length = initial_canvas.shape
    if clamp is not None:
        initial_canvas = jnp.where(clamp["mask"], clamp["ids"], initial_canvas)
    sc_dtype = jnp.dtype(model.config.param_dtype)
    # Rows finished in earlier blocks are discarded (fully padded) when a pad id exists: freeze them at once.
    done = finished & knobs["has_pad"] & knobs["early_stop"]
    state = dict(
        step=jnp.zeros((), jnp.int32), canvas=initial_canvas, argmax=initial_canvas,
        sc_logits=jnp.zeros((batch, canvas_length, model.config.vocab_size), sc_dtype),
        has_sc=jnp.zeros((), bool), done=done, passes=jnp.zeros((batch,), jnp.int32),
        history=jnp.full((plan.history_capacity, batch, canvas_length), -1, jnp.int32))

    def cond(s):
        return (s["step"] < plan.num_steps) & ~jnp.all(s["done"])

    def body(s):
        logits = model.decode(s["canvas"], cache, positions, self_conditioning_logits=s["sc_logits"],
                              self_conditioning_mask=jnp.broadcast_to(s["has_sc"], (batch,)))
        step_knobs = dict(knobs, temperatures_now=knobs["temperatures"][s["step"]])
        if clamp is None:
            scaled, argmax, accepted, canvas, entropy = _step_math(
                logits, tape.uniforms[block, s["step"]], tape.renoise[block, s["step"]], step_knobs)
            mean_entropy = jnp.mean(entropy, axis=-1)
        else:
            scaled, argmax, accepted, canvas, mean_entropy = _clamped_step(
                logits, tape.uniforms[block, s["step"]], tape.renoise[block, s["step"]], step_knobs, clamp)
        passes = s["passes"] + (~(s["done"] | finished)).astype(jnp.int32)
        # Rows already done keep their argmax, canvas and self-conditioning logits (the reference's freezing).
        frozen = s["done"]
        argmax = jnp.where(frozen[:, None], s["argmax"], argmax)
        canvas = jnp.where(frozen[:, None], s["canvas"], canvas)
        scaled = jnp.where(frozen[:, None, None], s["sc_logits"].astype(scaled.dtype), scaled)
        stop, history = steps.stable_and_confident(s["history"], argmax, mean_entropy,
                                                   knobs["stability_threshold"], knobs["confidence_threshold"])
        done = s["done"] | (stop & knobs["early_stop"])
        if should_stop is not None:
            done = done | _asks_to_stop(should_stop, after=passes)
        if on_step is not None:
            jax.debug.callback(_emit_step(on_step), block, plan.num_steps - s["step"], canvas, argmax, accepted,
                               done, ordered=True)
        return dict(step=s["step"] + 1, canvas=canvas, argmax=argmax, sc_logits=scaled.astype(sc_dtype),
                    has_sc=jnp.ones((), bool), done=done, passes=passes, history=history)

    out = jax.lax.while_loop(cond, body, state)
    return out["argmax"], out["passes"], out["step"]


# Far below any softcapped logit, and finite so that dividing by a temperature < 1 keeps it finite.
_BANNED_LOGIT = -1e9


def _clamped_step(logits, uniform, renoise, knobs, clamp):
    """`_step_math` with clamped positions (docs/SAMPLING.md, "Clamped positions"): the acceptance rule runs
    over the free positions only, then the clamped ones are accepted with their known token; an EOS id cannot
    be drawn before the row's last clamp (it would end the answer before a known token); the stop rule's mean
    entropy is over the free positions. Self-conditioning keeps the model's own logits everywhere, as in
    training. -> (scaled logits, argmax, accepted, next canvas, mean entropy [B])."""
    mask, ids = clamp["mask"], clamp["ids"]
    is_eos = jnp.any(jnp.arange(logits.shape[-1])[:, None] == knobs["eos_ids"][None, :], axis=-1)    # [V]
    logits = jnp.where(clamp["eos_banned"][..., None] & is_eos, jnp.asarray(_BANNED_LOGIT, logits.dtype), logits)
    scaled, argmax, accepted, canvas, entropy = _step_math(logits, uniform, renoise, knobs, clamped=mask)
    free = jnp.sum(~mask, axis=-1)
    mean_entropy = jnp.sum(entropy, axis=-1) / jnp.maximum(free, 1).astype(entropy.dtype)  # clamped read 0
    return (scaled, jnp.where(mask, ids, argmax), accepted | mask, jnp.where(mask, ids, canvas),
            jnp.where(jnp.any(mask, axis=-1), mean_entropy, jnp.mean(entropy, axis=-1)))


def _clamp_arrays(clamp_ids, clamp_mask, *, batch: int, width: int, vocab_size: int) -> dict[str, jax.Array]:
    """Validated clamp inputs [B, W <= width] -> {ids, mask, eos_banned} [B, width]: positions past W are free;
    `eos_banned` marks the free positions before a row's last clamped one."""
    ids, mask = np.asarray(clamp_ids), np.asarray(clamp_mask)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] != batch or ids.shape[1] > width:
        raise ValueError(f"clamp_ids {ids.shape} and clamp_mask {mask.shape} must both be [{batch}, W] with "
                         f"W <= {width} (the blocks' tokens)")
    if not np.issubdtype(ids.dtype, np.integer) or mask.dtype != np.bool_:
        raise ValueError(f"clamp_ids must be integers and clamp_mask booleans, got {ids.dtype} / {mask.dtype}")
    bad = mask & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"clamp_ids[{row}, {column}] = {int(ids[row, column])} is outside the vocabulary of "
                         f"{vocab_size}")
    full_ids = np.zeros((batch, width), np.int32)
    full_mask = np.zeros((batch, width), bool)
    full_ids[:, : ids.shape[1]] = np.where(mask, ids, 0)
    full_mask[:, : ids.shape[1]] = mask
    last = np.where(full_mask.any(axis=1), width - 1 - np.argmax(full_mask[:, ::-1], axis=1), -1)
    eos_banned = (np.arange(width)[None, :] < last[:, None]) & ~full_mask
    return dict(ids=jnp.asarray(full_ids), mask=jnp.asarray(full_mask), eos_banned=jnp.asarray(eos_banned))


def _asks_to_stop(should_stop, *, after: jax.Array) -> jax.Array:
    """should_stop() on the host, once `after` is computed (an unordered callback without an operand may run
    before the work it should follow)."""
    return io_callback(lambda _: np.bool_(should_stop()), jax.ShapeDtypeStruct((), jnp.bool_), after)


def _emit_step(callback):
    def emit(block, remaining, canvas, argmax, accepted, done):
        callback(StepEvent(int(block), int(remaining), np.asarray(canvas), np.asarray(argmax), np.asarray(accepted),
                           np.asarray(done)))
    return emit


def _emit_canvas(callback):
    def emit(block, canvas, finished):
        callback(CanvasEvent(int(block), np.asarray(canvas), np.asarray(finished)))
    return emit


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "on_step", "on_canvas", "should_stop"))
def _generate_jit(state, prompt_ids, prompt_mask, tape: NoiseTape, knobs, clamp, *, graphdef, plan: _Plan, on_step,
                  on_canvas, should_stop):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt_ids.shape
    canvas_length = model.config.canvas_length
    # The prompt is encoded in canvas-sized chunks by the same encoder call that appends each block, so the
    # program holds one encoder and one decoder. Extra left pads (masked) round it up to whole chunks; positions
    # are given explicitly so every real token keeps the reference's index position.
    extra = -prompt_length % canvas_length
    padded_length = prompt_length + extra
    total = padded_length + plan.num_blocks * canvas_length
    fill = jnp.where(knobs["has_pad"], knobs["pad_id"], 0)
    tokens = jnp.full((batch, total), fill, jnp.int32).at[:, extra:padded_length].set(prompt_ids)
    key_mask = jnp.ones((batch, total), bool).at[:, :padded_length].set(False)
    key_mask = key_mask.at[:, extra:padded_length].set(prompt_mask)
    chunk_offsets = jnp.arange(canvas_length, dtype=jnp.int32)

    def cond(carry):
        return (carry["block"] < plan.num_blocks) & ~jnp.all(carry["finished"])

    def body(carry):
        block = carry["block"]

        def encode_chunk(cache):
            start = cache.length
            chunk = jax.lax.dynamic_slice_in_dim(carry["tokens"], start, canvas_length, 1)
            mask = jax.lax.dynamic_slice_in_dim(key_mask, start, canvas_length, 1)
            positions = jnp.broadcast_to(start - extra + chunk_offsets, (batch, canvas_length))
            return model.encode(chunk, positions=positions, padding_mask=mask, cache=cache)[0]

        # Encode what the decoder has not seen: the whole prompt before block 0, the previous canvas after.
        target = padded_length + block * canvas_length
        cache = jax.lax.while_loop(lambda c: c.length < target, encode_chunk, carry["cache"])
        positions = jnp.broadcast_to(target - extra + chunk_offsets, (batch, canvas_length))
        block_clamp = None if clamp is None else jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, block * canvas_length, canvas_length, 1), clamp)
        argmax, passes, steps_run = _denoise_block(model, cache, positions, block, carry["finished"],
                                                   tape.initial_canvas[block], tape, knobs, plan, on_step,
                                                   should_stop, block_clamp)
        canvas, finished = steps.finalize_canvas(argmax, carry["finished"], knobs["eos_ids"], knobs["pad_id"],
                                                 use_pad=knobs["has_pad"])
        if should_stop is not None:
            finished = finished | _asks_to_stop(should_stop, after=steps_run)
        if on_canvas is not None:
            jax.debug.callback(_emit_canvas(on_canvas), block, canvas, finished, ordered=True)
        tokens = jax.lax.dynamic_update_slice_in_dim(carry["tokens"], canvas, target, 1)
        return dict(block=block + 1, cache=cache, tokens=tokens, finished=finished,
                    passes=carry["passes"] + passes,
                    steps_per_block=carry["steps_per_block"].at[block].set(steps_run))

    carry = dict(block=jnp.zeros((), jnp.int32), cache=model.init_cache(batch, total), tokens=tokens,
                 finished=jnp.zeros((batch,), bool), passes=jnp.zeros((batch,), jnp.int32),
                 steps_per_block=jnp.zeros((plan.num_blocks,), jnp.int32))
    carry = jax.lax.while_loop(cond, body, carry)
    return (carry["tokens"][:, extra:], carry["block"], carry["passes"], carry["steps_per_block"],
            carry["finished"])


def draw_noise(rng: jax.Array, *, batch_size: int, config: SamplerConfig, canvas_length: int,
               vocab_size: int) -> NoiseTape:
    """The `NoiseTape` a key stands for in `generate` (one stream per row: a row's draws do not depend on the
    other rows of its batch)."""
    return _draw_tape(_row_keys(rng, batch_size), num_blocks=config.num_blocks(canvas_length),
                      num_steps=config.max_denoising_steps, canvas_length=canvas_length, vocab_size=vocab_size)


def generate(model: DiffusionGemma, prompt_ids, prompt_mask=None, rng: jax.Array | NoiseTape | None = None,
             config: SamplerConfig | None = None, *, initial_canvas=None, clamp_ids=None, clamp_mask=None,
             on_step: Callable[[StepEvent], None] | None = None,
             on_canvas: Callable[[CanvasEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate ceil(max_new_tokens / C) blocks after left-padded prompts.

    prompt_ids [B, S] int, prompt_mask [B, S] (True = real token; pads on the left, as `left_pad` builds them;
    None = no padding). rng: a key (`draw_noise` derives one stream per row), B keys, or a `NoiseTape`; None
    means key 0. initial_canvas [B, C] replaces block 0's random starting canvas (the reference's
    `decoder_input_ids`). clamp_ids / clamp_mask [B, W] (W <= the blocks' tokens, usually max_new_tokens): known
    tokens of the generated sequence where the mask is True (infilling): written into the canvas from the start
    and after every step, accepted, never renoised, and so in the output unchanged (docs/SAMPLING.md, "Clamped
    positions"). on_step / on_canvas: host callbacks after every denoising step / block (reuse the same
    function objects: each distinct callback compiles its own program). should_stop: asked after every step;
    True ends the generation at once, its output then meaningless (the caller, who asked, discards it).
    """
    config = config or SamplerConfig()
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    batch = prompt_ids.shape[0]
    prompt_mask = jnp.ones(prompt_ids.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    canvas_length, vocab = model.config.canvas_length, model.config.vocab_size
    plan, knobs = _plan_and_knobs(config, canvas_length)
    if rng is None:
        rng = jax.random.key(0)
    if isinstance(rng, NoiseTape):
        tape = rng
        expected = (plan.num_blocks, plan.num_steps, batch, canvas_length)
        if tape.uniforms.shape != expected or tape.initial_canvas.shape != (plan.num_blocks, batch, canvas_length):
            raise ValueError(f"NoiseTape shapes {tape.uniforms.shape} / {tape.initial_canvas.shape} do not match "
                             f"(blocks, steps, batch, canvas) = {expected}")
    else:
        tape = draw_noise(jnp.asarray(rng), batch_size=batch, config=config, canvas_length=canvas_length,
                          vocab_size=vocab)
    if initial_canvas is not None:
        initial_canvas = jnp.asarray(initial_canvas, jnp.int32)
        if initial_canvas.shape != (batch, canvas_length):
            raise ValueError(f"initial_canvas must be [{batch}, {canvas_length}], got {initial_canvas.shape}")
        tape = tape.replace(initial_canvas=tape.initial_canvas.at[0].set(initial_canvas))
    if (clamp_ids is None) != (clamp_mask is None):
        raise ValueError("give both clamp_ids and clamp_mask, or neither")
    clamp = None if clamp_ids is None else _clamp_arrays(clamp_ids, clamp_mask, batch=batch, vocab_size=vocab,
                                                         width=plan.num_blocks * canvas_length)
    graphdef, state = nnx.split(model)
    tokens, num_blocks, passes, steps_per_block, finished = _generate_jit(
        state, prompt_ids, prompt_mask, tape, knobs, clamp, graphdef=graphdef, plan=plan, on_step=on_step,
        on_canvas=on_canvas, should_stop=should_stop)
    return GenerationResult(tokens=tokens, num_blocks=num_blocks, decoder_passes=passes,
                            steps_per_block=steps_per_block, finished=finished, prompt_length=prompt_ids.shape[1],
                            canvas_length=canvas_length, pad_token_id=config.pad_token_id)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (ids [B, S], mask [B, S]) padded on the left to the longest (or `length`)."""
    length = max(len(s) for s in sequences) if length is None else length
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, sequence in enumerate(sequences):
        if len(sequence) > length:
            raise ValueError(f"sequence {row} has {len(sequence)} tokens > length {length}")
        if len(sequence):
            ids[row, length - len(sequence):] = sequence
            mask[row, length - len(sequence):] = True
    return ids, mask
