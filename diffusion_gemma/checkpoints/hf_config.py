"""HuggingFace `config.json` <-> `ModelConfig`, exactly: a config.json read and written back over itself (as the
template) comes out unchanged, and a config.json written from scratch loads in transformers to the same shapes.

transformers fills fields a file leaves out with its own defaults (`_HF_TEXT_DEFAULTS`), derives the per-layer
shapes of full layers from `global_head_dim` / `num_global_key_value_heads` when there is no
`per_layer_config`, and forces the last layer to full attention; reading does the same. Text-config fields
this library does not model are refused, so that no knob is silently ignored.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from diffusion_gemma.config import (DEFAULT_ROPE_GLOBAL, DEFAULT_ROPE_LOCAL, FULL, HF_DEFAULT_GLOBAL_HEAD_DIM,
                                    SLIDING, ConfigError, ModelConfig, RopeConfig, default_layer_types)

CONFIG_FILE = "config.json"
HF_DEFAULT_SOFTCAP = 30.0
# Defaults that transformers applies when a config.json leaves a field out.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "sliding_window": 512,
    "attention_bias": False,
    "use_bidirectional_attention": None,
}
# Text-config keys we read; anything else in text_config is an error (a knob we would silently ignore).
_HF_TEXT_KNOWN = set(_HF_TEXT_DEFAULTS) | {
    "model_type", "layer_types", "rope_parameters", "per_layer_config", "num_experts", "top_k_experts",
    "moe_intermediate_size", "final_logit_softcapping", "tie_word_embeddings", "attention_dropout", "dtype",
    "global_head_dim", "num_global_key_value_heads", "torch_dtype", "architectures", "transformers_version",
    "enable_moe_block", "use_cache", "output_hidden_states", "output_attentions", "return_dict",
}
_HF_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
_HF_ROPE_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor", "factor")


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """One layer type's entry of `rope_parameters`."""
    out: dict[str, Any] = {}
    if rope.rope_type == "proportional" or rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.factor != 1.0:
        out["factor"] = rope.factor
    out["rope_theta"] = rope.theta
    out["rope_type"] = rope.rope_type
    return out


def _rope_from_hf(rope_parameters: Mapping[str, Any], layer_type: str, default: RopeConfig,
                  source: str) -> RopeConfig:
    params = rope_parameters.get(layer_type)
    if params is None:
        return default
    bad = sorted(set(params) - set(_HF_ROPE_KEYS))
    if bad:
        raise ConfigError(f"{source}: text_config.rope_parameters.{layer_type} has unsupported field(s) {bad}")
    return RopeConfig(rope_type=params.get("rope_type", "default"), theta=float(params["rope_theta"]),
                      partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                      factor=float(params.get("factor", 1.0)))


def model_config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE, **overrides) -> ModelConfig:
    """A DiffusionGemma `config.json` dict (outer config with `text_config`, or a bare text config) ->
    `ModelConfig`; `overrides` replace fields (dtypes, MoE implementation, ...). Errors name `source`."""
    text = hf.get("text_config", hf)
    if not isinstance(text, Mapping):
        raise ConfigError(f"{source}: text_config must be an object")
    if text.get("model_type", "diffusion_gemma_text") != "diffusion_gemma_text":
        raise ConfigError(f"{source}: text_config.model_type = {text.get('model_type')!r}, expected "
                          "'diffusion_gemma_text'")
    unknown = sorted(set(text) - _HF_TEXT_KNOWN)
    if unknown:
        raise ConfigError(f"{source}: unsupported text_config field(s) {unknown}")

    def get(key):
        return text.get(key, _HF_TEXT_DEFAULTS.get(key))

    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if text.get(key) is None:
            raise ConfigError(f"{source}: text_config.{key} is required (DiffusionGemma always has an MoE)")
    if get("hidden_activation") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{source}: text_config.hidden_activation = {get('hidden_activation')!r}; only "
                          "'gelu_pytorch_tanh' is supported")
    if get("attention_bias"):
        raise ConfigError(f"{source}: text_config.attention_bias must be false")
    if get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{source}: text_config.use_bidirectional_attention = 'all' is not supported "
                          "(the encoder is causal)")
    num_layers = get("num_hidden_layers")
    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = default_layer_types(num_layers)
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: text_config.layer_types has {len(layer_types)} entries, "
                          f"num_hidden_layers is {num_layers}")
    layer_types = tuple(layer_types[:-1]) + (FULL,)

    head_dim, kv = get("head_dim"), get("num_key_value_heads")
    head_dims = [head_dim] * num_layers
    kv_heads = [kv] * num_layers
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        global_hd = text.get("global_head_dim", HF_DEFAULT_GLOBAL_HEAD_DIM)
        global_kv = text.get("num_global_key_value_heads")
        for i, layer_type in enumerate(layer_types):
            if layer_type == FULL:
                head_dims[i] = global_hd
                if global_kv is not None:
                    kv_heads[i] = global_kv
    else:
        for key, override in per_layer.items():
            try:
                index = int(key)
            except ValueError:
                raise ConfigError(f"{source}: text_config.per_layer_config key {key!r} is not a layer index")
            if not 0 <= index < num_layers:
                raise ConfigError(f"{source}: text_config.per_layer_config[{key!r}] is outside 0..{num_layers - 1}")
            bad = sorted(set(override) - set(_HF_PER_LAYER_KEYS))
            if bad:
                raise ConfigError(f"{source}: text_config.per_layer_config[{key!r}] overrides unsupported "
                                  f"field(s) {bad}")
            head_dims[index] = override.get("head_dim", head_dim)
            kv_heads[index] = override.get("num_key_value_heads", kv)

    rope = text.get("rope_parameters") or {}
    eos = get("eos_token_id")
    canvas = hf.get("canvas_length", 256) if "text_config" in hf else 256
    kwargs = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_layers=num_layers, num_heads=get("num_attention_heads"), head_dim=head_dim, num_kv_heads=kv,
        layer_types=layer_types, layer_head_dims=tuple(head_dims), layer_kv_heads=tuple(kv_heads),
        sliding_window=get("sliding_window"), num_experts=text["num_experts"], top_k=text["top_k_experts"],
        moe_intermediate_size=text["moe_intermediate_size"],
        rope_local=_rope_from_hf(rope, SLIDING, DEFAULT_ROPE_LOCAL, source),
        rope_global=_rope_from_hf(rope, FULL, DEFAULT_ROPE_GLOBAL, source),
        rms_norm_eps=float(get("rms_norm_eps")),
        final_logit_softcap=text.get("final_logit_softcapping", HF_DEFAULT_SOFTCAP),
        canvas_length=canvas, max_position_embeddings=get("max_position_embeddings"),
        pad_token_id=get("pad_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        bos_token_id=get("bos_token_id"), initializer_range=get("initializer_range"))
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def model_config_from_hf_dir(hf_dir: str, **overrides) -> ModelConfig:
    """`model_config_from_hf` of the directory's config.json; a missing or malformed file names its path."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json in the HuggingFace directory") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    return model_config_from_hf(hf, source=path, **overrides)


def require_hf_expressible(config: ModelConfig) -> None:
    """Refuse a model whose config.json would describe a different model: transformers would load it silently
    with the wrong positions."""
    if config.grid_rope is not None:
        raise ConfigError("this model uses ModelConfig.grid_rope (cell geometry in the rotary), which a HuggingFace "
                          "config.json cannot express (its rotary turns with one 1-D position per token, no per-axis "
                          "rotary): transformers would load it with the wrong positions, so it is not exported")


def text_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `text_config` object of a config.json, every field spelled out (per-layer shapes explicitly)."""
    require_hf_expressible(config)
    width = len(str(config.num_layers - 1))
    per_layer = {}
    for i, (hd, kv) in enumerate(zip(config.layer_head_dims, config.layer_kv_heads)):
        override = {}
        if hd != config.head_dim:
            override["head_dim"] = hd
        if kv != config.num_kv_heads:
            override["num_key_value_heads"] = kv
        if override:
            per_layer[str(i).zfill(width)] = override
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "layer_types": list(config.layer_types),
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "diffusion_gemma_text",
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_experts": config.num_experts,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "pad_token_id": config.pad_token_id,
        "per_layer_config": per_layer,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {FULL: rope_to_hf(config.rope_global), SLIDING: rope_to_hf(config.rope_local)},
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": True,
        "top_k_experts": config.top_k,
        "use_bidirectional_attention": "vision",
        "vocab_size": config.vocab_size,
    }
    if config.final_logit_softcap != HF_DEFAULT_SOFTCAP:
        text["final_logit_softcapping"] = config.final_logit_softcap
    return dict(sorted(text.items()))


def model_config_to_hf(config: ModelConfig, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A full DiffusionGemma `config.json` dict. With `template` (the config.json this model was read from),
    every non-architectural field (vision tower, image token ids, ...) is carried over unchanged and text
    fields that we do not model keep their original form."""
    hf = copy.deepcopy(dict(template)) if template is not None else _default_outer_config()
    text = text_config_to_hf(config)
    if template is not None and "text_config" in template:
        original = template["text_config"]
        # Keep the original spelling of fields that carry the same meaning in another form.
        if "per_layer_config" not in original and _implicit_per_layer(config, original):
            del text["per_layer_config"]
        if "layer_types" not in original and default_layer_types(config.num_layers) == config.layer_types:
            del text["layer_types"]
        for key, value in original.items():
            if key not in text and key not in ("global_head_dim", "num_global_key_value_heads"):
                text[key] = copy.deepcopy(value)
        if "per_layer_config" not in text:
            for key in ("global_head_dim", "num_global_key_value_heads"):
                if key in original:
                    text[key] = original[key]
        if original.get("use_bidirectional_attention", "vision") != "vision":
            text["use_bidirectional_attention"] = original["use_bidirectional_attention"]
        implied = dict(_HF_TEXT_DEFAULTS, attention_dropout=0.0, tie_word_embeddings=True,
                       model_type="diffusion_gemma_text", rope_parameters=_default_hf_rope())
        for key in list(text):
            if key not in original and (key == "use_bidirectional_attention" or
                                        (key in implied and text[key] == implied[key])):
                del text[key]
        text = {key: text[key] for key in sorted(text)}
    hf["text_config"] = text
    if template is None or "canvas_length" in template or config.canvas_length != 256:
        hf["canvas_length"] = config.canvas_length
    return hf


def _implicit_per_layer(config: ModelConfig, original: Mapping[str, Any]) -> bool:
    """True when the per-layer shapes are what transformers derives from a config without per_layer_config."""
    global_hd = original.get("global_head_dim", HF_DEFAULT_GLOBAL_HEAD_DIM)
    global_kv = original.get("num_global_key_value_heads") or config.num_kv_heads
    for layer_type, hd, kv in config.layer_specs:
        expected = (global_hd, global_kv) if layer_type == FULL else (config.head_dim, config.num_kv_heads)
        if (hd, kv) != expected:
            return False
    return True


def _default_hf_rope() -> dict[str, Any]:
    return {FULL: rope_to_hf(DEFAULT_ROPE_GLOBAL), SLIDING: rope_to_hf(DEFAULT_ROPE_LOCAL)}


def _default_outer_config() -> dict[str, Any]:
    """The outer DiffusionGemma config (what transformers writes), with Gemma 4's default vision tower."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "boi_token_id": 255_999,
        "canvas_length": 256,
        "eoi_token_id": 258_882,
        "image_token_id": 258_880,
        "initializer_range": 0.02,
        "model_type": "diffusion_gemma",
        "text_config": {},
        "tie_word_embeddings": True,
        "vision_config": {"model_type": "gemma4_vision"},
    }
