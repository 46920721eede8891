"""Left-to-right greedy decoding through the encoder's causal-LM path.

The same shared stack that builds the diffusion KV cache is co-trained as a causal LM (the AR loss), so every
DiffusionGemma checkpoint is also an autoregressive model. Decoding it one token per forward is the baseline
the block-diffusion sampler is compared against (e.g. on constraint puzzles, where left-to-right order is a handicap).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_gemma.model.transformer import DiffusionGemma


@flax.struct.dataclass
class ArResult:
    """tokens [B, N]: the generated tokens (after an EOS: pad, or the EOS repeated without a pad id);
    forwards [B]: tokens produced before (and including) the first EOS — one forward each."""

    tokens: jax.Array
    forwards: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_jit(state, prompt_ids, prompt_mask, eos_ids, pad_id, *, graphdef, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt_ids.shape
    cache = model.init_cache(batch, prompt_length + max_new_tokens)
    cache, hidden = model.encode(prompt_ids, padding_mask=prompt_mask, cache=cache)
    first = jnp.argmax(model.lm_logits(hidden[:, -1:])[:, 0], axis=-1).astype(jnp.int32)

    def body(i, carry):
        cache, token, tokens, done, forwards = carry
        emitted = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, i].set(emitted)
        forwards = forwards + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        cache, hidden = model.encode(emitted[:, None], padding_mask=jnp.ones((batch, 1), bool), cache=cache)
        token = jnp.argmax(model.lm_logits(hidden)[:, 0], axis=-1).astype(jnp.int32)
        return cache, token, tokens, done, forwards

    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)
    init = (cache, first, tokens, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    _, _, tokens, _, forwards = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return tokens, forwards


def greedy_decode(model: DiffusionGemma, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
                  eos_token_ids: tuple[int, ...] = (), pad_token_id: int | None = None) -> ArResult:
    """Argmax decoding of `max_new_tokens` tokens after left-padded prompts [B, S], with a KV cache (one encoder
    forward of one token per step). Rows stop at an EOS (later slots hold `pad_token_id`, or the EOS)."""
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.ones(prompt_ids.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
    pad = jnp.int32(pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0))
    graphdef, state = nnx.split(model)
    tokens, forwards = _greedy_jit(state, prompt_ids, prompt_mask, eos, pad, graphdef=graphdef,
                                   max_new_tokens=int(max_new_tokens))
    return ArResult(tokens=tokens, forwards=forwards)

