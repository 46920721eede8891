"""The shared DiffusionGemma stack: `encode` (causal, builds the KV cache) and `decode` (bidirectional canvas).

One parameter stack serves both passes. Layers repeat with period P (`ModelConfig.scan_period`, 6 for the
released model): each of the P "slots" holds its parameters stacked over R = L / P repeats and the stack runs
as a `jax.lax.scan` over the repeats, so compile time stays flat in depth.

The cache is a fixed-shape buffer [R, B, T, Kv, hd] per slot plus a key mask and a fill length, so every
function jits. Cache semantics follow the reference: full layers see every encoded token; sliding layers see
the last W-1 encoded tokens from the decoder and a W-token causal window inside the encoder (the rules:
`model/masks.py`).
"""

from __future__ import annotations

from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma import sharding
from diffusion_gemma.config import SLIDING, ModelConfig
from diffusion_gemma.model import masks
from diffusion_gemma.model.attention import Attention, masked_attention
from diffusion_gemma.model.layers import (Buffer, Embedder, GatedMLP, RMSNorm, grid_rope_cos_sin, rms_norm,
                                          rope_cos_sin, rope_inv_freq)
from diffusion_gemma.model.moe import MoE

# `nnx.Intermediate` sown by every encode/decode pass when the MoE has a capacity factor: int32 [num_layers],
# the (token, expert) assignments each layer dropped. Collect with `nnx.capture(fn, nnx.Intermediate)`.
MOE_DROPPED_ASSIGNMENTS = "moe_dropped_assignments"


# Activation checkpointing of one scanned layer group (ModelConfig.remat): what the backward pass may keep.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
    """Per-slot keys/values [R, B, T, Kv, hd] (after k_norm + RoPE / v_norm), key_mask [B, T] (slot holds a
    real, non-pad token) and length (slots filled so far; the next token's index and default position)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]


class Block(nnx.Module):
    """One transformer layer: attention, then a dense gated MLP and an MoE in parallel on the same residual."""

    def __init__(self, config: ModelConfig, layer_type: str, head_dim: int, num_kv_heads: int, *, rngs: nnx.Rngs):
        dim, eps, dtype = config.hidden_size, config.rms_norm_eps, jnp.dtype(config.param_dtype)
        std = config.initializer_range
        self.layer_type = layer_type

        def norm():
            return RMSNorm(dim, eps=eps, param_dtype=dtype)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()
        self.post_feedforward_layernorm_1 = norm()
        self.post_feedforward_layernorm_2 = norm()
        self.pre_feedforward_layernorm_2 = norm()
        self.attn = Attention(hidden_size=dim, num_heads=config.num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, is_sliding=layer_type == SLIDING, eps=eps, std=std,
                              param_dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(dim, config.intermediate_size, std=std, param_dtype=dtype, rngs=rngs)
        self.moe = MoE(hidden_size=dim, num_experts=config.num_experts, top_k=config.top_k,
                       expert_dim=config.moe_intermediate_size, eps=eps, std=std, param_dtype=dtype,
                       impl=config.moe_impl, capacity_factor=config.moe_capacity_factor, rngs=rngs)
        # The checkpoint stores one layer_scalar for the encoder pass and one for the decoder pass.
        self.encoder_layer_scalar = Buffer(jnp.ones((1,), dtype), logical_axes=(None,))
        self.decoder_layer_scalar = Buffer(jnp.ones((1,), dtype), logical_axes=(None,))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, visible: jax.Array, cache_keys: jax.Array,
                 cache_values: jax.Array, *, encoding: bool, write_index: jax.Array | None = None,
                 token_mask: jax.Array | None = None):
        """Encoding writes this chunk's K/V into the cache at `write_index` and attends over the buffer;
        decoding attends over [cache ; canvas] and leaves the cache untouched. token_mask [B, S] (None: all
        real) keeps pad tokens out of the MoE. Returns (x, keys, values, MoE dropped-assignment count)."""
        dtype = x.dtype
        query, key, value = self.attn.project(self.input_layernorm(x), cos, sin)
        if encoding:
            cache_keys = jax.lax.dynamic_update_slice_in_dim(cache_keys, key.astype(cache_keys.dtype), write_index, 1)
            cache_values = jax.lax.dynamic_update_slice_in_dim(cache_values, value.astype(cache_values.dtype),
                                                               write_index, 1)
            keys, values = cache_keys.astype(dtype), cache_values.astype(dtype)
        else:
            keys = jnp.concatenate([cache_keys.astype(dtype), key], axis=1)
            values = jnp.concatenate([cache_values.astype(dtype), value], axis=1)
        attended = masked_attention(query, keys, values, visible)
        x = x + self.post_attention_layernorm(self.attn.output(attended))

        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        sparse, dropped = self.moe.forward(residual, self.pre_feedforward_layernorm_2(residual), token_mask)
        x = residual + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(sparse))
        scalar = self.encoder_layer_scalar if encoding else self.decoder_layer_scalar
        return x * scalar[...].astype(dtype), cache_keys, cache_values, dropped


class SelfConditioning(nnx.Module):
    """post_norm(embeds + down(gelu_tanh(gate(pre_norm(soft))) * up(pre_norm(soft)))); post_norm has no scale,
    so decoder inputs are RMS-normalised even when the self-conditioning signal is zero."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, std=config.initializer_range,
                            param_dtype=dtype, rngs=rngs)

    def __call__(self, embeds: jax.Array, soft_embeds: jax.Array | None) -> jax.Array:
        if soft_embeds is not None:
            embeds = embeds + self.mlp(self.pre_norm(soft_embeds))
        return rms_norm(embeds, None, self.eps)


def _stacked(make, repeats: int) -> nnx.Module:
    """R independently initialised copies of a module, merged into one whose arrays have a leading R axis."""
    copies = [make() for _ in range(repeats)]
    graphdef, _ = nnx.split(copies[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(c) for c in copies])
    module = nnx.merge(graphdef, stacked)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            variable.set_metadata("logical_axes", ("layers",) + tuple(variable.get_metadata()["logical_axes"]))
    return module


class DiffusionGemma(nnx.Module):
    """The DiffusionGemma text stack. `encode` + `decode` are the building blocks; `__call__` mirrors
    `DiffusionGemmaForBlockDiffusion(...).logits` (a fresh encode, then one decode of the canvas)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        self.embedder = Embedder(config.vocab_size, config.hidden_size, std=config.initializer_range,
                                 param_dtype=dtype, rngs=rngs)
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.self_conditioning = SelfConditioning(config, rngs=rngs)
        specs = config.layer_specs[: config.scan_period]
        self.blocks = nnx.List([
            _stacked(lambda spec=spec: Block(config, *spec, rngs=rngs), config.scan_repeats) for spec in specs])

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.dtype)

    def slot_specs(self) -> tuple[tuple[str, int, int], ...]:
        return self.config.layer_specs[: self.config.scan_period]

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty fixed-size cache able to hold `max_length` encoded tokens."""
        dtype = self.compute_dtype if dtype is None else dtype
        repeats = self.config.scan_repeats
        shapes = [(repeats, batch_size, max_length, kv, hd) for _, hd, kv in self.slot_specs()]
        return KVCache(keys=tuple(jnp.zeros(s, dtype) for s in shapes),
                       values=tuple(jnp.zeros(s, dtype) for s in shapes),
                       key_mask=jnp.zeros((batch_size, max_length), bool), length=jnp.zeros((), jnp.int32))

    def _rope_tables(self, positions: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        tables = {}
        for layer_type, head_dim, _ in self.slot_specs():
            if (layer_type, head_dim) not in tables:
                rope, grid = self.config.rope_for(layer_type), self.config.grid_rope_for(layer_type)
                tables[layer_type, head_dim] = (
                    rope_cos_sin(positions, rope_inv_freq(rope, head_dim), self.compute_dtype) if grid is None
                    else grid_rope_cos_sin(positions, grid, rope, head_dim, self.compute_dtype))
        return [tables[layer_type, head_dim] for layer_type, head_dim, _ in self.slot_specs()]

    def _run_stack(self, x, positions, visibility: Mapping[str, jax.Array], cache: KVCache, *, encoding: bool,
                   write_index=None, token_mask=None):
        graphdefs, states = zip(*[nnx.split(block) for block in self.blocks])
        tables = self._rope_tables(positions)
        specs = self.slot_specs()

        def body(x, per_repeat):
            slot_states, slot_keys, slot_values = per_repeat
            new_keys, new_values, dropped = [], [], []
            for slot, (layer_type, _, _) in enumerate(specs):
                block = nnx.merge(graphdefs[slot], slot_states[slot])
                cos, sin = tables[slot]
                x, keys, values, slot_dropped = block(sharding.constrain_batch(x), cos, sin, visibility[layer_type],
                                                      slot_keys[slot], slot_values[slot], encoding=encoding,
                                                      write_index=write_index, token_mask=token_mask)
                new_keys.append(keys)
                new_values.append(values)
                dropped.append(slot_dropped)
            return x, (tuple(new_keys), tuple(new_values), jnp.stack(dropped))

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        x, (keys, values, dropped) = jax.lax.scan(body, x, (tuple(states), cache.keys, cache.values))
        if self.config.moe_capacity_factor is not None:
            # [R, P] -> [L]: layer r * P + s is repeat r of slot s.
            self.sow(nnx.Intermediate, MOE_DROPPED_ASSIGNMENTS, dropped.reshape(-1))
        return x, keys, values

    def lm_logits(self, normed_hidden: jax.Array) -> jax.Array:
        """Tied output projection of final-normed hidden states, cast to fp32 and softcapped."""
        logits = self.embedder.decode(normed_hidden).astype(jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    # ------------------------------------------------------------------------------------------- public API
    def encode(self, input_ids: jax.Array, positions: jax.Array | None = None, padding_mask: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[KVCache, jax.Array]:
        """Causally encode a chunk [B, S] appended to `cache` (a new cache of length S when None).

        positions default to cache.length + arange(S) (the reference's index positions); padding_mask [B, S] marks
        real tokens (False = pad, never attended). Returns (cache, final-normed hidden states [B, S, D]).
        """
        batch, chunk = input_ids.shape
        if cache is None:
            cache = self.init_cache(batch, chunk)
        start = cache.length
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
        if padding_mask is None:
            padding_mask = jnp.ones((batch, chunk), bool)
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, padding_mask.astype(bool), start, 1)
        visibility = masks.encoder_visibility(key_mask, self.config.sliding_window, query_start=start,
                                              num_queries=chunk)

        x = self.embedder.encode(input_ids, self.compute_dtype)
        x, keys, values = self._run_stack(x, positions, visibility, cache, encoding=True, write_index=start,
                                          token_mask=padding_mask)
        new_cache = KVCache(keys=keys, values=values, key_mask=key_mask, length=start + chunk)
        return new_cache, self.final_norm(x)

    def decode(self, canvas_ids: jax.Array, cache: KVCache, positions: jax.Array | None = None,
               self_conditioning_logits: jax.Array | None = None, self_conditioning_mask: jax.Array | None = None,
               visibility: Mapping[str, jax.Array] | None = None, canvas_mask: jax.Array | None = None) -> jax.Array:
        """Denoise a canvas [B, C] against a read-only cache -> fp32 softcapped logits [B, C, V].

        positions default to cache.length + arange(C). `visibility` (per layer type, bool [B, C, T + C]) overrides
        the default `masks.inference_decoder_visibility`, e.g. with the block-causal training visibility.
        canvas_mask [B, C] marks real canvas tokens (default: all); the others are kept out of the MoE.
        """
        batch, canvas_length = canvas_ids.shape
        dtype = self.compute_dtype
        if positions is None:
            positions = jnp.broadcast_to(cache.length + jnp.arange(canvas_length, dtype=jnp.int32),
                                         (batch, canvas_length))
        if visibility is None:
            visibility = masks.inference_decoder_visibility(cache.key_mask, cache.length, canvas_length,
                                                            self.config.sliding_window)
        embeds = self.embedder.encode(canvas_ids, dtype)
        soft = None
        if self_conditioning_logits is not None:
            probs = jax.nn.softmax(self_conditioning_logits.astype(jnp.float32), axis=-1)
            soft = self.embedder.soft_encode(probs.astype(jnp.dtype(self.config.param_dtype)), dtype)
            if self_conditioning_mask is not None:
                soft = soft * self_conditioning_mask.astype(dtype)[:, None, None]
        x = self.self_conditioning(embeds, soft)
        x, _, _ = self._run_stack(x, positions, visibility, cache, encoding=False, token_mask=canvas_mask)
        return self.lm_logits(self.final_norm(x))

    def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 self_conditioning_logits: jax.Array | None = None, self_conditioning_mask: jax.Array | None = None,
                 decoder_position_ids: jax.Array | None = None) -> jax.Array:
        """Same arguments and canvas logits as `DiffusionGemmaForBlockDiffusion(...).logits`; the decoder's key
        mask comes from `attention_mask` (the reference's decoder_attention_mask = [attention_mask ; ones])."""
        cache, _ = self.encode(input_ids, padding_mask=None if attention_mask is None else attention_mask.astype(bool))
        if decoder_position_ids is not None:
            decoder_position_ids = jnp.broadcast_to(decoder_position_ids, decoder_input_ids.shape)
        return self.decode(decoder_input_ids, cache, decoder_position_ids, self_conditioning_logits,
                           self_conditioning_mask)
