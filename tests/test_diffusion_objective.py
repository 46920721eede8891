"""The composed objective on a tiny float32 model: the selected-block fast path against the full-canvas oracle,
leakage through the real forward, self-conditioning wiring, what trains (the trainer's own split: the router stays
frozen unless asked), and exactness under micro-batching and data parallelism.

Compiles dominate the runtime, so each jitted function is built once at module level and reused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_gemma.config import ModelConfig
from diffusion_gemma.objective import sft as objective, randomness
from diffusion_gemma.objective.batching import SftBatch
from diffusion_gemma.objective.sft import (AR_RESPONSE, FULL_RESPONSE, ObjectiveSettings, denoise_canvas,
                                           loss_counts, loss_fn, micro_batch_loss_fn, prepare_canvas)
from diffusion_gemma.objective.self_conditioning import sample_coins
from diffusion_gemma.model import moe as moe_module
from diffusion_gemma.model.layers import rms_norm
from diffusion_gemma.model.lora import LoRA
from diffusion_gemma.model.moe import ROUTER_PARAMS
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.training.config import TrainConfigError, from_config_dict
from diffusion_gemma.training.optimizer import trainable_filter
from diffusion_gemma.training.setup import objective_settings

VOCAB, EOS, PAD = 32, 1, 0
BLOCK, LENGTH, BATCH = 4, 24, 8
CONFIG = ModelConfig.tiny(num_layers=2, vocab_size=VOCAB, sliding_window=6)   # one sliding + one full layer
SETTINGS = ObjectiveSettings(block_size=BLOCK)
FULL_SETTINGS = ObjectiveSettings(block_size=BLOCK, canvas=FULL_RESPONSE)
RNG = jax.random.key(42)
# Compiling dominates these tests; LLVM optimisation of the tiny programs halves compile time and buys nothing.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
SCALE_LIKE = {"weight", "router_scale", "per_expert_scale", "encoder_layer_scalar", "decoder_layer_scalar"}


def numpy_initialised(make_module, seed=0, std=0.05):
    """The module with numpy-drawn weights: scales near 1, kernels N(0, std). Far cheaper on CPU than compiling
    one random-normal kernel per parameter shape, and less uniform than the real init (ones everywhere)."""
    graphdef, state = nnx.split(nnx.eval_shape(make_module))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = {getattr(entry, "key", getattr(entry, "name", None)) for entry in path}
        noise = rng.normal(size=leaf.shape)
        values = 1.0 + 0.1 * noise if names & SCALE_LIKE else std * noise
        return jnp.asarray(values, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def random_sft_batch(seed, batch, length):
    """Ragged single-turn examples: prompt, response, EOS fill up to a block multiple (cut at the row end), pad.
    Row 0 is a prompt without response (nothing supervised)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    attention = np.zeros((batch, length), bool)
    supervised = np.zeros((batch, length), bool)
    starts = rng.integers(1, 8, batch)
    for b in range(batch):
        response = 0 if b == 0 else rng.integers(1, length - starts[b] + 1)
        end = min(starts[b] + -(-response // BLOCK) * BLOCK, length)
        ids[b, starts[b] + response:end] = EOS
        attention[b, :end] = True
        supervised[b, starts[b]:end] = True
    ids = np.where(attention, ids, PAD)
    return SftBatch(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(attention),
                    supervised_mask=jnp.asarray(supervised), response_start=jnp.asarray(starts, jnp.int32),
                    example_index=jnp.arange(100, 100 + batch, dtype=jnp.int32))


MODEL = numpy_initialised(lambda: DiffusionGemma(CONFIG, rngs=nnx.Rngs(0)))
GRAPHDEF, PARAMS, BUFFERS = nnx.split(MODEL, trainable_filter(lora=False), ...)  # what full SFT trains
BATCH_DATA = random_sft_batch(0, BATCH, LENGTH)
COINS = sample_coins(randomness.example_keys(RNG, BATCH_DATA.example_index), SETTINGS.self_conditioning_probability)

value_and_grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True), static_argnums=(0, 4),
                            compiler_options=QUICK_COMPILE)


@functools.partial(jax.jit, static_argnums=(4,), compiler_options=QUICK_COMPILE)
def denoise_against(params, encoder_ids, batch, coins, settings):
    """The training canvas of `batch` denoised against the encoding of `encoder_ids` (the batch's own clean
    tokens, or an edited copy) -> (canvas, objective logits under `coins`, logits without self-conditioning)."""
    model = nnx.merge(GRAPHDEF, params, BUFFERS)
    _, canvas, _ = prepare_canvas(batch, RNG, settings, CONFIG)
    cache, _ = model.encode(encoder_ids, padding_mask=batch.attention_mask)
    unconditioned = model.decode(canvas.noised_ids, cache, canvas.positions, visibility=canvas.visibility)
    return canvas, denoise_canvas(model, cache, canvas, coins, settings), unconditioned


def chosen_blocks(canvas):
    return np.asarray(canvas.blocks)[:, 0]


@pytest.fixture(scope="module")
def selected_run():
    (loss, metrics), grads = value_and_grad_fn(GRAPHDEF, PARAMS, BATCH_DATA, RNG, SETTINGS, BUFFERS)
    return jax.device_get((loss, metrics, grads))


def assert_trees_close(actual, expected, rtol=1e-4, atol_fraction=1e-5):
    """Leaf-wise closeness with an absolute floor relative to the leaf's scale (gradients span many decades)."""
    for (path, wanted), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        wanted, got = np.asarray(wanted), np.asarray(got)
        np.testing.assert_allclose(got, wanted, rtol=rtol, atol=atol_fraction * max(np.abs(wanted).max(), 1e-12),
                                   err_msg=jax.tree_util.keystr(path))


def test_selected_block_equals_the_full_canvas_oracle(selected_run):
    loss, metrics, grads = selected_run
    (full_loss, full_metrics), full_grads = jax.device_get(
        value_and_grad_fn(GRAPHDEF, PARAMS, BATCH_DATA, RNG, FULL_SETTINGS, BUFFERS))
    np.testing.assert_allclose(full_loss, loss, rtol=1e-5)
    assert_trees_close(full_metrics, metrics)
    assert_trees_close(full_grads, grads)

    assert np.asarray(COINS).any() and not np.asarray(COINS).all()        # both self-conditioning branches run
    selected, selected_logits, _ = denoise_against(PARAMS, BATCH_DATA.input_ids, BATCH_DATA, COINS, SETTINGS)
    _, full_logits, _ = denoise_against(PARAMS, BATCH_DATA.input_ids, BATCH_DATA, COINS, FULL_SETTINGS)
    columns = chosen_blocks(selected)[:, None] * BLOCK + np.arange(BLOCK)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(full_logits), columns[:, :, None], axis=1),
                               np.asarray(selected_logits), rtol=1e-5, atol=1e-5)


def test_loss_is_the_scored_cross_entropy_mean_plus_the_weighted_ar_mean(selected_run):
    loss, metrics, _ = selected_run
    canvas, logits, _ = jax.device_get(denoise_against(PARAMS, BATCH_DATA.input_ids, BATCH_DATA, COINS, SETTINGS))
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probs, canvas.clean_ids[..., None], axis=-1)[..., 0]
    diffusion_sum, diffusion_count = metrics["diffusion_loss"]
    assert diffusion_count == canvas.scored_mask.sum() > 0
    np.testing.assert_allclose(diffusion_sum, token_losses[canvas.scored_mask].sum(), rtol=1e-5)
    ar_sum, ar_count = metrics["ar_loss"]
    np.testing.assert_allclose(loss, diffusion_sum / diffusion_count + SETTINGS.ar_weight * ar_sum / ar_count,
                               rtol=1e-6)


def _replace_tokens(ids, attention, where, seed):
    """New random tokens at `where` (real positions only; the attention mask is unchanged)."""
    fresh = np.random.default_rng(seed).integers(3, VOCAB, ids.shape)
    return jnp.asarray(np.where(where & attention, fresh, ids), jnp.int32)


def test_a_block_never_sees_its_own_or_later_clean_tokens_but_sees_earlier_ones():
    canvas, reference, _ = jax.device_get(denoise_against(PARAMS, BATCH_DATA.input_ids, BATCH_DATA, COINS, SETTINGS))
    ids, attention = np.asarray(BATCH_DATA.input_ids), np.asarray(BATCH_DATA.attention_mask)
    block_start = np.asarray(BATCH_DATA.response_start) + chosen_blocks(canvas) * BLOCK
    positions = np.arange(LENGTH)[None, :]

    def logits(new_ids):
        return np.asarray(denoise_against(PARAMS, new_ids, BATCH_DATA, COINS, SETTINGS)[1])

    own_and_later = _replace_tokens(ids, attention, positions >= block_start[:, None], 1)
    np.testing.assert_array_equal(logits(own_and_later), reference)

    has_earlier_block = chosen_blocks(canvas) > 0
    assert has_earlier_block.sum() >= 2
    earlier = (positions >= block_start[:, None] - BLOCK) & (positions < block_start[:, None])
    changed = logits(_replace_tokens(ids, attention, earlier & has_earlier_block[:, None], 2))
    difference = np.abs(changed - reference).max(axis=(1, 2))
    assert np.all(difference[has_earlier_block] > 1e-4)
    assert np.all(difference[~has_earlier_block] == 0)


@jax.jit
def _decoder_inputs(embeds, probs):
    """(no signal, signal switched off by a False coin as `decode` applies it, signal on)."""
    soft = MODEL.embedder.soft_encode(probs, jnp.float32)
    off = soft * jnp.zeros((embeds.shape[0],), jnp.float32)[:, None, None]
    return tuple(MODEL.self_conditioning(embeds, signal) for signal in (None, off, soft))


def test_a_false_coin_gives_exactly_the_unconditioned_decoder_input():
    embeds = MODEL.embedder.encode(BATCH_DATA.input_ids[:2, :BLOCK], jnp.float32)
    probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(2, BLOCK, VOCAB)), jnp.float32))
    no_signal, switched_off, switched_on = _decoder_inputs(embeds, probs)
    expected = rms_norm(embeds, None, CONFIG.rms_norm_eps)
    np.testing.assert_array_equal(no_signal, expected)
    np.testing.assert_array_equal(switched_off, expected)
    assert np.abs(np.asarray(switched_on - expected)).max() > 1e-3


def test_coins_switch_self_conditioning_per_example_in_the_objective():
    args = (PARAMS, BATCH_DATA.input_ids, BATCH_DATA)
    _, mixed, unconditioned = jax.device_get(denoise_against(*args, COINS, SETTINGS))
    _, all_off, _ = jax.device_get(denoise_against(*args, jnp.zeros_like(COINS), SETTINGS))
    coins = np.asarray(COINS)
    np.testing.assert_allclose(all_off, unconditioned, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[~coins], unconditioned[~coins], rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(mixed[coins] - unconditioned[coins]).max(axis=(1, 2)) > 1e-3)


def _named(tree, name):
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if name in {getattr(entry, "key", None) for entry in path}]


def test_full_sft_leaves_the_router_out_of_what_is_differentiated_and_trains_the_rest(selected_run):
    _, _, grads = selected_run
    for name in ROUTER_PARAMS:
        assert not _named(grads, name) and _named(BUFFERS, name), name
    for name in ("q_proj", "o_proj", "gate_up_proj", "per_expert_scale", "embedding", "gate_proj"):
        assert all(np.abs(np.asarray(leaf)).max() > 0 for leaf in _named(grads, name)), name


def _moe_layer():
    return numpy_initialised(lambda: moe_module.MoE(
        hidden_size=CONFIG.hidden_size, num_experts=CONFIG.num_experts, top_k=CONFIG.top_k,
        expert_dim=CONFIG.moe_intermediate_size, eps=CONFIG.rms_norm_eps, std=0.02, param_dtype=jnp.float32,
        impl="dense", rngs=nnx.Rngs(0)), std=0.3)


_MOE_INPUTS = tuple(jnp.asarray(x, jnp.float32)  # residual, normed, output weights, each [2, 5, D]
                    for x in np.random.default_rng(0).normal(size=(3, 2, 5, CONFIG.hidden_size)))


def _moe_grads(layer, trains):
    """Gradients of a weighted sum of the MoE output w.r.t. the parameters `trains` selects and the residual."""
    graphdef, params, frozen = nnx.split(layer, trains, ...)
    residual, normed, weights = _MOE_INPUTS

    def moe_loss(params, residual):
        return jnp.sum(nnx.merge(graphdef, params, frozen)(residual, normed) * weights)

    return jax.jit(jax.grad(moe_loss, argnums=(0, 1)))(params, residual)


def test_routing_weights_still_carry_gradient_to_the_hidden_states(monkeypatch):
    """The router reads the raw residual and the experts a separately normed copy, so the MoE output's gradient
    w.r.t. the residual flows ONLY through the routing weights: non-zero with the router frozen, and exactly zero
    once the routing weights themselves are stop-gradiented."""
    layer = _moe_layer()
    param_grads, residual_grad = _moe_grads(layer, trainable_filter(lora=False))
    assert np.abs(np.asarray(residual_grad)).max() > 1e-3
    assert not any(_named(param_grads, name) for name in ROUTER_PARAMS)

    original_route = moe_module.route
    monkeypatch.setattr(moe_module, "route", lambda *args, **kwargs: jax.tree.map(
        jax.lax.stop_gradient, original_route(*args, **kwargs)))
    _, detached_residual_grad = _moe_grads(layer, trainable_filter(lora=False))
    assert np.all(np.asarray(detached_residual_grad) == 0)


def test_the_router_trains_when_unfrozen_and_through_a_lora_adapter_on_it():
    layer = _moe_layer()
    unfrozen, _ = _moe_grads(layer, trainable_filter(lora=False, freeze_router=False))
    for name in ROUTER_PARAMS:
        assert all(np.abs(np.asarray(leaf)).max() > 0 for leaf in _named(unfrozen, name)), name

    layer.router_proj_lora = LoRA(layer.router_proj.shape, batch_dims=0, in_dims=1, rank=2, alpha=4.0,
                                  rngs=nnx.Rngs(1))
    adapter_grads, _ = _moe_grads(layer, trainable_filter(lora=True))
    trained = {path for path, _ in nnx.to_flat_state(adapter_grads)}
    assert trained == {("router_proj_lora", "a"), ("router_proj_lora", "b")}
    assert np.abs(np.asarray(adapter_grads["router_proj_lora"]["b"][...])).max() > 0  # (a's is 0 while b is 0)


@functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
def _encoder_logits(params, ids, attention):
    model = nnx.merge(GRAPHDEF, params, BUFFERS)
    _, hidden = model.encode(ids, padding_mask=attention)
    return model.lm_logits(hidden[:, :-1])


def test_ar_on_the_response_predicts_only_supervised_tokens(selected_run):
    """ar_targets=response: the AR term is the encoder's next-token loss over the pairs whose predicted token is
    supervised, the model-free count agrees, and the diffusion term is untouched."""
    _, metrics, _ = selected_run
    settings = ObjectiveSettings(block_size=BLOCK, ar_targets=AR_RESPONSE)
    _, response_metrics = jax.device_get(jax.jit(loss_fn, static_argnums=(0, 4), compiler_options=QUICK_COMPILE)(
        GRAPHDEF, PARAMS, BATCH_DATA, RNG, settings, BUFFERS))
    logits = np.asarray(_encoder_logits(PARAMS, BATCH_DATA.input_ids, BATCH_DATA.attention_mask))
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    ids, real = np.asarray(BATCH_DATA.input_ids), np.asarray(BATCH_DATA.attention_mask)
    token_losses = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    response_pairs = real[:, :-1] & real[:, 1:] & np.asarray(BATCH_DATA.supervised_mask)[:, 1:]
    ar_sum, ar_count = response_metrics["ar_loss"]
    assert 0 < ar_count == response_pairs.sum() < metrics["ar_loss"][1]
    np.testing.assert_allclose(ar_sum, token_losses[response_pairs].sum(), rtol=1e-5)
    assert int(loss_counts(BATCH_DATA, RNG, settings).ar) == ar_count
    np.testing.assert_allclose(response_metrics["diffusion_loss"], metrics["diffusion_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="ar_targets"):
        ObjectiveSettings(ar_targets="prompt")
    assert objective_settings(from_config_dict({"objective": {"ar_targets": "response"}})).ar_targets == AR_RESPONSE
    with pytest.raises(TrainConfigError, match="objective.ar_targets = 'prompt'; expected 'sequence'"):
        from_config_dict({"objective": {"ar_targets": "prompt"}})


def test_micro_batches_add_up_to_the_global_batch(selected_run):
    loss, metrics, grads = selected_run
    global_counts = jax.jit(loss_counts, static_argnums=2)(BATCH_DATA, RNG, SETTINGS)
    step = jax.jit(jax.value_and_grad(micro_batch_loss_fn, argnums=1, has_aux=True), static_argnums=(0, 4),
                   compiler_options=QUICK_COMPILE)
    totals = None
    for start in range(0, BATCH, 2):
        micro_batch = jax.tree.map(lambda field: field[start:start + 2], BATCH_DATA)
        out = step(GRAPHDEF, PARAMS, micro_batch, RNG, SETTINGS, global_counts, BUFFERS)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    (micro_loss, micro_metrics), micro_grads = jax.device_get(totals)
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-5)
    assert_trees_close(micro_metrics, metrics)
    assert_trees_close(micro_grads, grads)
    assert int(global_counts.diffusion) == int(metrics["diffusion_loss"][1])
    assert int(global_counts.ar) == int(metrics["ar_loss"][1])
    # The (sum, count) form: add the micro-batch sums, divide once.
    summed = objective.LossSums(diffusion=micro_metrics["diffusion_loss"][0], ar=micro_metrics["ar_loss"][0],
                                counts=global_counts)
    np.testing.assert_allclose(summed.total(SETTINGS.ar_weight), loss, rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
def test_eight_devices_equal_one(selected_run):
    loss, metrics, grads = selected_run
    # Auto axes: the model's encoder builds its cache without sharding annotations (see the report on Explicit).
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_batch = jax.device_put(BATCH_DATA, NamedSharding(mesh, PartitionSpec("data")))
    replicated = NamedSharding(mesh, PartitionSpec())
    params, buffers = jax.device_put((PARAMS, BUFFERS), replicated)
    (sharded_loss, sharded_metrics), sharded_grads = value_and_grad_fn(GRAPHDEF, params, sharded_batch, RNG,
                                                                       SETTINGS, buffers)
    assert len(sharded_loss.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded_loss), loss, rtol=1e-5)
    assert_trees_close(jax.device_get(sharded_metrics), metrics)
    assert_trees_close(jax.device_get(sharded_grads), grads)
