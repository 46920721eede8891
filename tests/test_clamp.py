"""Clamped canvas positions (infilling): known response tokens are given to the model clean and never scored in
training, and are written into the canvas, accepted and never resampled in sampling (docs/TRAINING.md,
docs/SAMPLING.md). Without a clamp everything is as before: the objective bit for bit (here), the sampler token
for token with transformers (tests/test_sampler.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data import pipeline
from diffusion_gemma.data.chat import pack_example
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.objective import batching, randomness
from diffusion_gemma.objective.batching import SftBatch
from diffusion_gemma.objective.corruption import ABSORBING, CorruptionSettings, corrupt
from diffusion_gemma.objective.self_conditioning import sample_coins
from diffusion_gemma.objective.sft import denoise_canvas, loss_counts, prepare_canvas
from diffusion_gemma.sampling import sampler as sampler_lib
from diffusion_gemma.sampling.sampler import SamplerConfig, generate, left_pad
from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval
from diffusion_gemma.tasks.sudoku.formats import CompactFormat
from diffusion_gemma.tasks.sudoku.source import SudokuDataOptions, SudokuSource
from test_diffusion_objective import (BATCH_DATA, BLOCK, BUFFERS, CONFIG, GRAPHDEF, PARAMS, QUICK_COMPILE, RNG,
                                      SETTINGS, numpy_initialised, value_and_grad_fn)


# ------------------------------------------------------------------------------------------------- data
def test_pack_example_marks_answer_relative_clamps():
    example = pack_example([2, 7, 8], [5, 6, 9], eos_id=1, pad_id=0, seq_length=12, block_size=4, clamped=[0, 2])
    assert np.flatnonzero(example.clamped).tolist() == [3, 5]
    assert not (example.clamped & ~example.supervised).any()
    plain = pack_example([2, 7, 8], [5, 6, 9], eos_id=1, pad_id=0, seq_length=12, block_size=4)
    assert plain.clamped.shape == (12,) and not plain.clamped.any()
    cut = pack_example([2, 7, 8], [5, 6, 9], eos_id=1, pad_id=0, seq_length=5, block_size=4, clamped=[1, 2])
    assert np.flatnonzero(cut.clamped).tolist() == [4]  # position 5 fell off the row with its token
    for outside in (-1, 3):  # 3 is the EOS fill, not the answer
        with pytest.raises(ValueError, match=f"clamped answer position {outside} is outside the answer of 3"):
            pack_example([2], [5, 6, 9], eos_id=1, pad_id=0, seq_length=12, block_size=4, clamped=[outside])


class _ClampingSource:
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return pack_example([2, 3 + index], [4, 5, 6], eos_id=1, pad_id=0, seq_length=8, block_size=4,
                            clamped=[index % 3])


def test_pipeline_batches_carry_the_clamp():
    config = pipeline.DataConfig(seq_length=8, block_size=4, global_batch_size=3)
    batch = next(iter(pipeline.make_dataset(_ClampingSource(), config, num_steps=1)))
    prompt_tokens = batch["input_ids"][:, 1] - 3
    np.testing.assert_array_equal(np.argmax(batch["clamped_mask"], axis=1), 2 + prompt_tokens % 3)
    assert batch["clamped_mask"].sum() == 3 and SftBatch(**batch).clamped.sum() == 3
    synthetic = pipeline.make_source(config)
    plain = next(iter(pipeline.make_dataset(synthetic, config, num_steps=1)))
    assert plain["clamped_mask"].shape == plain["supervised_mask"].shape and not plain["clamped_mask"].any()


# ------------------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("settings", [CorruptionSettings(), CorruptionSettings(eps=0.999),
                                      CorruptionSettings(kind=ABSORBING, mask_token_id=0)],
                         ids=["uniform", "t_near_1", "absorbing"])
def test_clamped_positions_are_never_corrupted(settings):
    rng = np.random.default_rng(0)
    rows, length = 2048, 32
    clean = jnp.asarray(rng.integers(1, 64, (rows, length)), jnp.int32)
    supervised = rng.random((rows, length)) < 0.7
    clamped = supervised & (rng.random((rows, length)) < 0.4)
    keys = randomness.example_keys(jax.random.key(1), jnp.arange(rows))
    run = jax.jit(corrupt, static_argnames=("vocab_size", "settings"))
    out = run(clean, jnp.asarray(supervised), keys, vocab_size=64, settings=settings,
              clamped_mask=jnp.asarray(clamped))
    plain = run(clean, jnp.asarray(supervised), keys, vocab_size=64, settings=settings)
    noise = np.asarray(out.noise_mask)
    assert not noise[clamped].any()
    np.testing.assert_array_equal(np.asarray(out.noised_ids)[clamped], np.asarray(clean)[clamped])
    # The other positions keep exactly the noise they had without the clamp, whatever the example's t.
    np.testing.assert_array_equal(noise, np.asarray(plain.noise_mask) & ~clamped)
    np.testing.assert_array_equal(np.asarray(out.rate), np.asarray(plain.rate))
    free = supervised & ~clamped
    assert noise[free].mean() > (0.99 if settings.eps > 0.9 else 0.3)


# ------------------------------------------------------------------------------------------- objective
def _clamp_for(batch: SftBatch, seed: int = 5) -> np.ndarray:
    """About half of every block's supervised tokens, never a block's first one (so every block keeps a token
    to score and the block choice is the unclamped batch's)."""
    rng = np.random.default_rng(seed)
    supervised = np.asarray(batch.supervised_mask)
    offsets = np.arange(supervised.shape[1])[None, :] - np.asarray(batch.response_start)[:, None]
    first_of_block = (offsets >= 0) & (offsets % BLOCK == 0)
    return supervised & ~first_of_block & (rng.random(supervised.shape) < 0.5)


@functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
def _decode_hand_canvas(params, batch, noised_ids):
    """The unclamped batch's training canvas with `noised_ids` in place of its noisy input, denoised exactly as
    the objective does (same cache, coins and self-conditioning)."""
    model = nnx.merge(GRAPHDEF, params, BUFFERS)
    _, canvas, keys = prepare_canvas(batch, RNG, SETTINGS, CONFIG)
    cache, _ = model.encode(batch.input_ids, padding_mask=batch.attention_mask)
    coins = sample_coins(keys, SETTINGS.self_conditioning_probability)
    return denoise_canvas(model, cache, canvas.replace(noised_ids=noised_ids), coins, SETTINGS)


@pytest.fixture(scope="module")
def objective_runs():
    clamp = _clamp_for(BATCH_DATA)
    runs = {}
    for name, batch in (("none", BATCH_DATA),
                        ("all_false", BATCH_DATA.replace(clamped_mask=jnp.zeros_like(BATCH_DATA.supervised_mask))),
                        ("clamped", BATCH_DATA.replace(clamped_mask=jnp.asarray(clamp)))):
        runs[name] = jax.device_get(value_and_grad_fn(GRAPHDEF, PARAMS, batch, RNG, SETTINGS, BUFFERS))
    return clamp, runs


def test_all_false_clamp_is_bit_identical_to_no_clamp(objective_runs):
    _, runs = objective_runs
    (loss, metrics), grads = runs["none"]
    (loss_f, metrics_f), grads_f = runs["all_false"]
    assert np.asarray(loss) == np.asarray(loss_f)
    for a, b in zip(jax.tree.leaves((metrics, grads)), jax.tree.leaves((metrics_f, grads_f))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clamped_loss_is_the_cross_entropy_over_the_unclamped_cells(objective_runs):
    clamp, runs = objective_runs
    (loss, metrics), grads = runs["clamped"]
    # By hand: the unclamped batch's canvas with the clamped cells put back clean, scored on the other cells.
    _, canvas, _ = jax.device_get(prepare_canvas(BATCH_DATA, RNG, SETTINGS, CONFIG))
    rows = np.arange(clamp.shape[0])[:, None]
    in_row = canvas.positions < clamp.shape[1]
    clamped_cells = in_row & clamp[rows, np.minimum(canvas.positions, clamp.shape[1] - 1)]
    assert (clamped_cells & canvas.scored_mask).sum() > 3  # the clamp reaches the scored blocks
    noised = np.where(clamped_cells, canvas.clean_ids, canvas.noised_ids)
    logits = np.asarray(_decode_hand_canvas(PARAMS, BATCH_DATA, jnp.asarray(noised)), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probs, canvas.clean_ids[..., None], axis=-1)[..., 0]
    scored = canvas.scored_mask & ~clamped_cells
    diffusion_sum, diffusion_count = metrics["diffusion_loss"]
    assert diffusion_count == scored.sum()
    np.testing.assert_allclose(diffusion_sum, token_losses[scored].sum(), rtol=1e-5)
    assert metrics["accuracy_corrupted"][1] == (scored & canvas.noise_mask & ~clamped_cells).sum()
    assert metrics["accuracy_clean"][1] == (scored & ~canvas.noise_mask).sum()
    # The AR loss reads the clean encoder row: the clamp does not touch it.
    (_, plain_metrics), _ = runs["none"]
    np.testing.assert_array_equal(np.asarray(metrics["ar_loss"]), np.asarray(plain_metrics["ar_loss"]))
    ar_sum, ar_count = metrics["ar_loss"]
    np.testing.assert_allclose(loss, diffusion_sum / diffusion_count + SETTINGS.ar_weight * ar_sum / ar_count,
                               rtol=1e-6)
    counts = loss_counts(BATCH_DATA.replace(clamped_mask=jnp.asarray(clamp)), RNG, SETTINGS)
    assert int(counts.diffusion) == scored.sum()


def test_a_fully_clamped_block_is_never_chosen():
    length, rows = 12, 64
    supervised = np.zeros((rows, length), bool)
    supervised[:, 2:10] = True                 # response blocks 0 and 1 (block size 4)
    clamped = np.zeros_like(supervised)
    clamped[:, 2:6] = True                     # block 0 entirely known
    batch = SftBatch(input_ids=jnp.full((rows, length), 5, jnp.int32), attention_mask=jnp.ones((rows, length), bool),
                     supervised_mask=jnp.asarray(supervised), response_start=jnp.full((rows,), 2, jnp.int32),
                     example_index=jnp.arange(rows, dtype=jnp.int32), clamped_mask=jnp.asarray(clamped))
    keys = randomness.example_keys(jax.random.key(0), batch.example_index)
    assert np.all(np.asarray(batching.choose_blocks(batch.denoised_mask, batch.response_start, keys, 4)) == 1)
    plain = np.asarray(batching.choose_blocks(batch.supervised_mask, batch.response_start, keys, 4))
    assert set(plain.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------- sampler
SAMPLER_CONFIG = ModelConfig.tiny(num_layers=2, vocab_size=32, canvas_length=8, sliding_window=6)
PROMPTS = left_pad([[2, 5, 6, 7], [2, 8, 9]], pad_id=0)
BASE = SamplerConfig(max_new_tokens=16, max_denoising_steps=5, eos_token_ids=(1,), pad_token_id=0,
                     early_stop=False)


@pytest.fixture(scope="module")
def sampler_model():
    return numpy_initialised(lambda: DiffusionGemma(SAMPLER_CONFIG, rngs=nnx.Rngs(0)), seed=1, std=0.3)


def _clamp(seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 16)) < 0.4
    mask[0, 15] = True                             # block 1 has a clamp
    return rng.integers(3, 32, (2, 16)).astype(np.int32), mask


class Steps:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


STEPS = Steps()  # one callback object: one compiled program for every strategy


# The strictest setting of each rule accepts exactly one free position per step.
STRICTEST = {"entropy_bound": dict(entropy_bound=1e-9), "confidence": dict(accept_confidence=1.0),
             "top_k": dict(accept_top_k=1), "margin": dict(accept_margin=1.0)}


@pytest.mark.parametrize("acceptance", sampler_lib.ACCEPTANCE_RULES)
def test_clamped_tokens_are_written_accepted_and_never_change(sampler_model, acceptance):
    ids, mask = _clamp()
    config = BASE.replace(acceptance=acceptance, **STRICTEST.get(acceptance, {}))
    STEPS.events.clear()
    result = generate(sampler_model, *PROMPTS, jax.random.key(3), config, clamp_ids=ids, clamp_mask=mask,
                      on_step=STEPS)
    generated = result.generated()
    np.testing.assert_array_equal(generated[mask], ids[mask])
    assert len(STEPS.events) == 2 * BASE.max_denoising_steps
    for event in STEPS.events:
        columns = slice(event.block * 8, event.block * 8 + 8)
        block_mask, block_ids = mask[:, columns], ids[:, columns]
        for values in (event.canvas, event.argmax):
            np.testing.assert_array_equal(values[block_mask], block_ids[block_mask])
        assert event.accepted[block_mask].all()
        # Clamped positions take no slot of the rule: exactly one free position is accepted per step.
        np.testing.assert_array_equal((event.accepted & ~block_mask).sum(axis=1), 1)


def test_an_all_false_clamp_generates_what_no_clamp_does(sampler_model):
    ids, _ = _clamp()
    plain = generate(sampler_model, *PROMPTS, jax.random.key(3), BASE)
    empty = generate(sampler_model, *PROMPTS, jax.random.key(3), BASE, clamp_ids=ids,
                     clamp_mask=np.zeros(ids.shape, bool))
    np.testing.assert_array_equal(plain.generated(), empty.generated())


def test_no_eos_before_the_last_clamp(sampler_model):
    eos = tuple(range(3, 24))                         # most of the vocabulary ends the answer
    config = BASE.replace(eos_token_ids=eos)
    plain = generate(sampler_model, *PROMPTS, jax.random.key(4), config)
    assert int(plain.num_blocks) == 1                 # without a clamp both rows stop in the first block
    ids = np.full((2, 14), 30, np.int32)
    mask = np.zeros((2, 14), bool)
    mask[:, 13] = True                                # a known token in the second block
    result = generate(sampler_model, *PROMPTS, jax.random.key(4), config, clamp_ids=ids, clamp_mask=mask)
    generated = result.generated()
    assert int(result.num_blocks) == 2 and (generated[:, 13] == 30).all()
    assert not np.isin(generated[:, :13], eos).any()


def test_a_fully_clamped_block_is_settled_at_once(sampler_model):
    config = BASE.replace(early_stop=True)
    plain = generate(sampler_model, *PROMPTS, jax.random.key(5), config)
    assert np.asarray(plain.steps_per_block).tolist() == [5, 5]   # a random model is never confident
    ids = np.random.default_rng(1).integers(3, 32, (2, 16)).astype(np.int32)
    result = generate(sampler_model, *PROMPTS, jax.random.key(5), config, clamp_ids=ids,
                      clamp_mask=np.ones((2, 16), bool))
    # Stable from the first step (the history needs one earlier step to compare) and nothing left uncertain.
    assert np.asarray(result.steps_per_block).tolist() == [2, 2]
    np.testing.assert_array_equal(result.generated(), ids)


def test_bad_clamps_are_named(sampler_model):
    ids, mask = _clamp()
    cases = [(dict(clamp_ids=ids), "give both clamp_ids and clamp_mask"),
             (dict(clamp_ids=ids[:1], clamp_mask=mask[:1]), r"must both be \[2, W\] with W <= 16"),
             (dict(clamp_ids=np.zeros((2, 17), np.int32), clamp_mask=np.zeros((2, 17), bool)), "W <= 16"),
             (dict(clamp_ids=np.where(mask, 40, ids), clamp_mask=mask), r"clamp_ids\[0, \d+\] = 40 is outside"),
             (dict(clamp_ids=ids, clamp_mask=mask.astype(int)), "clamp_mask booleans")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(sampler_model, *PROMPTS, jax.random.key(0), BASE, **kwargs)


# ----------------------------------------------------------------------------------------------- Sudoku
TINY_SUDOKU = ModelConfig.tiny(num_layers=1, hidden_size=32, intermediate_size=48, num_heads=2, head_dim=8,
                               num_kv_heads=1, global_head_dim=16, num_global_kv_heads=1, num_experts=8, top_k=2,
                               moe_intermediate_size=16, vocab_size=16, sliding_window=256, canvas_length=81)


def test_sudoku_source_clamps_the_givens_cells():
    kwargs = dict(num_examples=4, seed=0, min_givens=30, max_givens=40, seq_length=82 + 81, block_size=81)
    source, plain = SudokuSource(clamp_givens=True, **kwargs), SudokuSource(**kwargs)
    for index in range(2):
        puzzle, _ = source.puzzle(index)
        example = source[index]
        assert (np.flatnonzero(example.clamped) - example.response_start).tolist() == np.flatnonzero(puzzle).tolist()
        np.testing.assert_array_equal(example.tokens, plain[index].tokens)
        assert not plain[index].clamped.any()
    assert SudokuDataOptions(clamp_givens=True).clamp_givens
    with pytest.raises(ValueError, match="clamp_givens needs the compact format"):
        SudokuDataOptions(format="chat", clamp_givens=True)


def test_a_tiny_sudoku_model_keeps_every_given_when_clamped():
    model = numpy_initialised(lambda: DiffusionGemma(TINY_SUDOKU, rngs=nnx.Rngs(0)), seed=2, std=0.3)
    fmt = CompactFormat()
    puzzles, _ = sudoku_eval.eval_puzzles(6, seed=7, min_givens=28, max_givens=45)
    config = sudoku_eval.sampler_config(fmt, TINY_SUDOKU.canvas_length, max_denoising_steps=4)
    kept = {}
    for clamp_givens in (False, True):  # batches of 4: the second one is padded with a repeated puzzle
        answers = sudoku_eval.solve_diffusion(model, puzzles, fmt, config, batch_size=4, clamp_givens=clamp_givens)
        kept[clamp_givens] = [np.array_equal(board[puzzle > 0], puzzle[puzzle > 0])
                              for puzzle, board in zip(puzzles, answers.boards)]
    assert all(kept[True])
    assert not any(kept[False])  # an untrained model does not copy them by itself
