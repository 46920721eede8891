"""The table between HuggingFace DiffusionGemma tensor names and our parameter tree.

Each entry maps one HF tensor to one place in `nnx.state(model)` (a path, plus the repeat index for stacked
layer parameters) with a pair of pure layout transforms. Loading, exporting and the streaming converter all
walk this one table, tensor by tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from diffusion_gemma.config import SLIDING, ModelConfig

Transform = Callable[[np.ndarray], np.ndarray]

DECODER = "model.decoder."
ENCODER_LAYERS = "model.encoder.language_model.layers."


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_key: str
    path: tuple            # path in nnx.state(model)
    repeat: int | None     # index along the stacked-layers axis, None for unstacked parameters
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]  # without the stacked-layers axis
    to_ours: Transform
    to_hf: Transform


def _identity(x):
    return x


def _transpose2d(x):
    return np.ascontiguousarray(x.T)


def _split_out(*out_shape):
    """HF [out, in] -> ours [in, *out_shape]."""
    return (lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape),
            lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T))


def _split_in(*in_shape):
    """HF [out, in] -> ours [*in_shape, out]."""
    return (lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, w.shape[0]),
            lambda w: np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T))


def _swap_last(x):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def tensor_mappings(config: ModelConfig) -> Iterator[TensorMapping]:
    """Every text tensor of a DiffusionGemma checkpoint, in a stable order."""
    dim, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, experts, expert_dim = config.num_heads, config.num_experts, config.moe_intermediate_size
    period = config.scan_period

    yield TensorMapping(DECODER + "embed_tokens.weight", ("embedder", "embedding"), None, (vocab, dim), (vocab, dim),
                        _identity, _identity)
    yield TensorMapping(DECODER + "norm.weight", ("final_norm", "weight"), None, (dim,), (dim,), _identity, _identity)
    sc = DECODER + "self_conditioning."
    yield TensorMapping(sc + "pre_norm.weight", ("self_conditioning", "pre_norm", "weight"), None, (dim,), (dim,),
                        _identity, _identity)
    for name, hf_shape in (("gate_proj", (inter, dim)), ("up_proj", (inter, dim)), ("down_proj", (dim, inter))):
        yield TensorMapping(sc + f"{name}.weight", ("self_conditioning", "mlp", name), None, hf_shape,
                            hf_shape[::-1], _transpose2d, _transpose2d)

    for index, (layer_type, head_dim, kv_heads) in enumerate(config.layer_specs):
        slot, repeat = index % period, index // period
        prefix = f"{DECODER}layers.{index}."

        def entry(hf_name, path, hf_shape, our_shape, to_ours=_identity, to_hf=_identity, hf_prefix=prefix):
            return TensorMapping(hf_prefix + hf_name, ("blocks", slot) + path, repeat, hf_shape, our_shape,
                                 to_ours, to_hf)

        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            yield entry(f"{norm}.weight", (norm, "weight"), (dim,), (dim,))
        yield entry("layer_scalar", ("decoder_layer_scalar",), (1,), (1,))
        yield entry("layer_scalar", ("encoder_layer_scalar",), (1,), (1,), hf_prefix=f"{ENCODER_LAYERS}{index}.")

        yield entry("self_attn.q_proj.weight", ("attn", "q_proj"), (heads * head_dim, dim), (dim, heads, head_dim),
                    *_split_out(heads, head_dim))
        kv_names = ("k_proj", "v_proj") if layer_type == SLIDING else ("k_proj",)
        for name in kv_names:
            yield entry(f"self_attn.{name}.weight", ("attn", name), (kv_heads * head_dim, dim),
                        (dim, kv_heads, head_dim), *_split_out(kv_heads, head_dim))
        yield entry("self_attn.o_proj.weight", ("attn", "o_proj"), (dim, heads * head_dim), (heads, head_dim, dim),
                    *_split_in(heads, head_dim))
        yield entry("self_attn.q_norm.weight", ("attn", "q_norm", "weight"), (head_dim,), (head_dim,))
        yield entry("self_attn.k_norm.weight", ("attn", "k_norm", "weight"), (head_dim,), (head_dim,))

        for name, hf_shape in (("gate_proj", (inter, dim)), ("up_proj", (inter, dim)), ("down_proj", (dim, inter))):
            yield entry(f"mlp.{name}.weight", ("mlp", name), hf_shape, hf_shape[::-1], _transpose2d, _transpose2d)

        yield entry("router.proj.weight", ("moe", "router_proj"), (experts, dim), (dim, experts), _transpose2d,
                    _transpose2d)
        yield entry("router.scale", ("moe", "router_scale"), (dim,), (dim,))
        yield entry("router.per_expert_scale", ("moe", "per_expert_scale"), (experts,), (experts,))
        yield entry("experts.gate_up_proj", ("moe", "gate_up_proj"), (experts, 2 * expert_dim, dim),
                    (experts, dim, 2 * expert_dim), _swap_last, _swap_last)
        yield entry("experts.down_proj", ("moe", "down_proj"), (experts, dim, expert_dim),
                    (experts, expert_dim, dim), _swap_last, _swap_last)


def is_text_key(hf_key: str) -> bool:
    """Keys the text stack owns; everything else (vision tower, embed_vision) is carried through untouched."""
    return hf_key.startswith(DECODER) or hf_key.startswith(ENCODER_LAYERS)
