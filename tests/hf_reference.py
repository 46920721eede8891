"""Tiny random HuggingFace `DiffusionGemmaForBlockDiffusion` reference checkpoints, shared by the parity tests.

`make_reference(path, ...)` builds a tiny model (eager attention, a one-layer Gemma 4 vision tower that the text
stack ignores), optionally randomises every "ones-initialised" tensor the reference would otherwise leave at 1,
and saves it with `save_pretrained`. `ReferenceBank` memoises one checkpoint per configuration so a module-scoped
fixture builds each configuration once. The `reference_*` helpers run the torch model the way our API is used:
one full forward, or the encoder chunk by chunk on one `DynamicCache` followed by read-only decodes.
`float64_twin` + `float64_mode()` run the same reference entirely in float64: the yardstick for float32 rounding.

Tying in the reference (transformers 5.23, checked here): every text weight of
`model.encoder.language_model` IS the decoder's tensor (`_tied_weights_keys` ties parameters only), but the
`layer_scalar` buffers are NOT tied: encoder and decoder copies are separate tensors and `save_pretrained` writes
both (`model.decoder.layers.{i}.layer_scalar` and `model.encoder.language_model.layers.{i}.layer_scalar`).
`randomize_` gives the two copies different values so a loader that mixes them up fails.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as hf_dg

# The reference models here are tiny: torch's intra-op thread pool only adds overhead, and on a busy 2-core machine
# its spinning threads slow a forward pass down by 10-50x.
torch.set_num_threads(1)

SLIDING = "sliding_attention"
FULL = "full_attention"

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8)


def reference_config(*, layers: int = 7, layer_types: Sequence[str] | None = None, sliding_window: int = 4,
                     head_dim: int = 8, global_head_dim: int = 16, num_heads: int = 4, num_kv_heads: int = 2,
                     num_global_kv_heads: int | None = 1, hidden_size: int = 32, intermediate_size: int = 48,
                     vocab_size: int = 128, num_experts: int = 6, top_k: int = 2, moe_intermediate_size: int = 16,
                     canvas_length: int = 8, max_position_embeddings: int = 256,
                     attn_implementation: str = "eager") -> DiffusionGemmaConfig:
    """A tiny `DiffusionGemmaConfig` (global head dim / kv heads given the transformers way, not per layer)."""
    text: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, sliding_window=sliding_window, num_experts=num_experts, top_k_experts=top_k,
        moe_intermediate_size=moe_intermediate_size, max_position_embeddings=max_position_embeddings,
        global_head_dim=global_head_dim, use_bidirectional_attention="vision")
    if num_global_kv_heads is not None:
        text["num_global_key_value_heads"] = num_global_kv_heads
    if layer_types is not None:
        text["layer_types"] = list(layer_types)
    config = DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=canvas_length)
    config._attn_implementation = attn_implementation
    return config


def _text_modules(model: DiffusionGemmaForBlockDiffusion):
    """(encoder text model, decoder) of the reference."""
    return model.model.encoder.language_model, model.model.decoder


@torch.no_grad()
def randomize_(model: DiffusionGemmaForBlockDiffusion, *, seed: int, spread: float = 0.3,
               weight_scale: float = 1.0) -> None:
    """In place: every scaled RMSNorm weight, router.scale and router.per_expert_scale -> 1 + spread * N(0, 1);
    decoder and encoder layer_scalar buffers -> independent U(0.5, 1.5) draws (so the two copies differ);
    every text matrix (projections, experts, router, embedding) times `weight_scale`."""
    gen = torch.Generator().manual_seed(seed)

    def normal_like(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    encoder, decoder = _text_modules(model)
    seen: set[int] = set()
    for root in (decoder, encoder):  # tied tensors are visited once (the decoder owns them)
        for module in root.modules():
            if isinstance(module, hf_dg.DiffusionGemmaRMSNorm) and module.with_scale:
                targets = [module.weight]
            elif isinstance(module, hf_dg.DiffusionGemmaTextRouter):
                targets = [module.scale, module.per_expert_scale]
            else:
                continue
            for tensor in targets:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensor.copy_(1.0 + spread * normal_like(tensor))
    for root in (decoder, encoder):
        for layer in root.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(layer.layer_scalar.shape, generator=gen))
    if weight_scale != 1.0:
        scaled: set[int] = set()
        for root in (decoder, encoder):
            for tensor in root.parameters():
                if tensor.ndim >= 2 and id(tensor) not in scaled:
                    scaled.add(id(tensor))
                    tensor.mul_(weight_scale)


def make_reference(path: str, *, seed: int = 0, randomize: bool = True, weight_scale: float = 1.0,
                   max_shard_size: str | int | None = None,
                   **config_kwargs) -> tuple[DiffusionGemmaForBlockDiffusion, str]:
    """Build a tiny random reference (see `reference_config` for the knobs), save it to `path` with
    `save_pretrained` and return (eval-mode torch model, path). Weights stay at the reference's own init
    (normal, std 0.02) unless `weight_scale` != 1."""
    config = reference_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config).eval()
    if randomize:
        randomize_(model, seed=seed + 1, weight_scale=weight_scale)
    elif weight_scale != 1.0:
        raise ValueError("weight_scale needs randomize=True")
    os.makedirs(path, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model, path


class ReferenceBank:
    """Memoised `make_reference`: one checkpoint directory per distinct set of keyword arguments."""

    def __init__(self, root: str):
        self.root = root
        self._built: dict[tuple, tuple[DiffusionGemmaForBlockDiffusion, str]] = {}

    def get(self, **kwargs) -> tuple[DiffusionGemmaForBlockDiffusion, str]:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in self._built:
            path = os.path.join(self.root, f"ref{len(self._built)}")
            self._built[key] = make_reference(path, **kwargs)
        return self._built[key]


# ------------------------------------------------------------------------------------------ running the reference
def _t(x) -> torch.Tensor | None:
    if x is None:
        return None
    array = np.asarray(x)
    return torch.from_numpy(array.astype(np.int64) if array.dtype.kind in "iub" else array.astype(np.float32))


class _Float64Everywhere(TorchFunctionMode):
    """Every torch call asked for float32 (`.float()`, `dtype=torch.float32`, `.to(torch.float32)`) runs in float64
    instead, and a float32 result is an error: the reference keeps its RMSNorms, softmaxes, rotary angles and
    logit softcap in float32 even when its weights are float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in (kwargs or {}).items()}
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.dtype == torch.float32:
            raise AssertionError(f"{func} returned float32 inside the float64 reference")
        return result


_FLOAT64_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float64_twin(model: DiffusionGemmaForBlockDiffusion) -> DiffusionGemmaForBlockDiffusion:
    """A float64 copy of `model` (memoised), rotary tables recomputed in float64 and eager experts (torch's
    grouped_mm has no float64 kernel). Run it inside `float64_mode()` so no op falls back to float32."""
    if model not in _FLOAT64_TWINS:
        twin = copy.deepcopy(model).double()
        twin.set_experts_implementation("eager")
        for rotary in (twin.model.encoder.language_model.rotary_emb, twin.model.decoder.rotary_emb):
            for layer_type, inv_freq in float64_inv_freq(rotary).items():
                setattr(rotary, f"{layer_type}_inv_freq", inv_freq)
        _FLOAT64_TWINS[model] = twin
    return _FLOAT64_TWINS[model]


def float64_inv_freq(rotary: hf_dg.DiffusionGemmaTextRotaryEmbedding) -> dict[str, torch.Tensor]:
    """{layer type: the reference's own inverse-frequency formula evaluated in float64} (its buffers are float32)."""
    with float64_mode():
        return {layer_type: init(rotary.config.per_layer_config[layer_type], layer_type=layer_type)[0]
                for layer_type, init in rotary.rope_init_fns.items()}


def float64_mode() -> TorchFunctionMode:
    """Context manager: float64 wherever the reference asks for float32 (see `float64_twin`)."""
    return _Float64Everywhere()


@torch.no_grad()
def reference_forward(model: DiffusionGemmaForBlockDiffusion, input_ids, decoder_input_ids, *, attention_mask=None,
                      self_conditioning_logits=None, self_conditioning_mask=None,
                      decoder_position_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """One `DiffusionGemmaForBlockDiffusion` call -> (fp32 canvas logits, encoder last hidden state). With an
    `attention_mask` [B, S] the decoder gets `decoder_attention_mask = [attention_mask ; ones(C)]`."""
    decoder_attention_mask = None
    if attention_mask is not None:
        canvas = np.ones(np.shape(decoder_input_ids), np.asarray(attention_mask).dtype)
        decoder_attention_mask = _t(np.concatenate([np.asarray(attention_mask), canvas], axis=1))
    mask = None if self_conditioning_mask is None else torch.from_numpy(np.asarray(self_conditioning_mask, bool))
    out = model(input_ids=_t(input_ids), attention_mask=_t(attention_mask), decoder_input_ids=_t(decoder_input_ids),
                decoder_attention_mask=decoder_attention_mask,
                self_conditioning_logits=_t(self_conditioning_logits), self_conditioning_mask=mask,
                decoder_position_ids=_t(decoder_position_ids))
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def new_reference_cache(model: DiffusionGemmaForBlockDiffusion) -> DynamicCache:
    return DynamicCache(config=model.config.text_config)


@torch.no_grad()
def reference_encode(model: DiffusionGemmaForBlockDiffusion, input_ids, cache: DynamicCache) -> np.ndarray:
    """Run the encoder on one chunk, appending to `cache` in place -> final-normed hidden states [B, S, D]."""
    out = model.model.encoder(input_ids=_t(input_ids), past_key_values=cache)
    return out.last_hidden_state.numpy()


@torch.no_grad()
def reference_decode(model: DiffusionGemmaForBlockDiffusion, decoder_input_ids, cache: DynamicCache, *,
                     self_conditioning_logits=None, self_conditioning_mask=None) -> np.ndarray:
    """Denoise one canvas against the (read-only) cache -> fp32 softcapped logits [B, C, V]."""
    mask = None if self_conditioning_mask is None else torch.from_numpy(np.asarray(self_conditioning_mask, bool))
    out = model(past_key_values=cache, decoder_input_ids=_t(decoder_input_ids),
                self_conditioning_logits=_t(self_conditioning_logits), self_conditioning_mask=mask)
    return out.logits.numpy()
