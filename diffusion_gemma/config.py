"""The model configuration: every architectural knob of DiffusionGemma in one frozen dataclass.

`ModelConfig` is what library code sees. HuggingFace `config.json` files are converted at the edge with
`ModelConfig.from_hf_config` / `ModelConfig.to_hf_config`, exactly (a round trip leaves the file unchanged).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any, Mapping

from diffusion_gemma import registry

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional")
# "expert_parallel*" run under a mesh with an 'expert' axis (diffusion_gemma/model/expert_parallel.py).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_IMPLEMENTATIONS = ("grouped", "dense", "expert_parallel", "expert_parallel_ragged")
DTYPES = ("float32", "bfloat16", "float16")

# Defaults that transformers applies when a config.json leaves a field out.
HF_DEFAULT_GLOBAL_HEAD_DIM = 512
HF_DEFAULT_SOFTCAP = 30.0
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


class ConfigError(ValueError):
    """An invalid or inconsistent configuration; the message names the offending field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding of one layer type. `proportional` rotates `partial_rotary_factor * head_dim / 2` angles
    whose frequencies use the FULL head dim as denominator; the remaining dims pass through unrotated."""

    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0

    @classmethod
    def first_period(cls, period: float, head_dim: int) -> "RopeConfig":
        """Full rotary whose fastest rotated pair after the first turns once every `period` positions (theta =
        (period / 2pi) ** (head_dim / 2)). On a grid flattened row by row (period = the row length) the attention
        logits can then single out same-column cells directly instead of learning it from 10,000-base angles."""
        return cls(rope_type="default", theta=float((period / (2 * math.pi)) ** (head_dim / 2)))

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rope_type == "proportional" or self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.factor != 1.0:
            out["factor"] = self.factor
        out["rope_theta"] = self.theta
        out["rope_type"] = self.rope_type
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the DiffusionGemma text stack (see docs/ARCHITECTURE.md for the math).

    Per-layer attention shapes are explicit tuples: `layer_head_dims[i]` and `layer_kv_heads[i]`.
    Sliding layers normally use `head_dim` / `num_kv_heads`; full layers the global overrides.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    layer_types: tuple[str, ...]
    layer_head_dims: tuple[int, ...]
    layer_kv_heads: tuple[int, ...]
    sliding_window: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    rope_local: RopeConfig = RopeConfig(rope_type="default", theta=10_000.0)
    rope_global: RopeConfig = RopeConfig(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25)
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float = 30.0
    canvas_length: int = 256
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    bos_token_id: int = 2
    initializer_range: float = 0.02
    # Numerics and implementation choices (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"
    moe_impl: str = "grouped"
    # Expert-parallel 'expert_parallel' only: per device-pair buffer = factor * (its tokens * top_k / expert
    # shards); assignments beyond it are dropped and counted. None = dropless.
    moe_capacity_factor: float | None = None
    # Activation checkpointing of each scanned layer group: "none", "full" (save nothing), "dots" (save matmul
    # outputs) or "dots_no_batch" (save matmul outputs without batch dims).
    remat: str = "none"

    def __post_init__(self):
        # Config files (ml-collections) can only carry plain dicts; turn them into RopeConfig here.
        for name in ("rope_local", "rope_global"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                unknown = sorted(set(value) - {f.name for f in dataclasses.fields(RopeConfig)})
                if unknown:
                    raise ConfigError(f"ModelConfig.{name}: unknown field(s) {unknown}")
                object.__setattr__(self, name, RopeConfig(**value))
        self.validate()

    # ----------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim",
                    "num_kv_heads", "sliding_window", "num_experts", "top_k", "moe_intermediate_size",
                    "canvas_length", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("layer_types", "layer_head_dims", "layer_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise ConfigError(f"ModelConfig.{name} must be a tuple, got {type(value).__name__}")
            if len(value) != self.num_layers:
                raise ConfigError(
                    f"ModelConfig.{name} has {len(value)} entries but num_layers is {self.num_layers}")
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ConfigError(f"ModelConfig.layer_types[{i}] = {layer_type!r}; expected one of {LAYER_TYPES}")
        if self.layer_types[-1] != FULL:
            raise ConfigError(f"ModelConfig.layer_types[-1] must be {FULL!r} (the reference forces the last layer "
                              f"full), got {self.layer_types[-1]!r}")
        for i, (hd, kv) in enumerate(zip(self.layer_head_dims, self.layer_kv_heads)):
            if hd <= 0 or hd % 2:
                raise ConfigError(f"ModelConfig.layer_head_dims[{i}] must be a positive even integer, got {hd}")
            if kv <= 0 or self.num_heads % kv:
                raise ConfigError(f"ModelConfig.layer_kv_heads[{i}] = {kv} must divide num_heads = {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig.num_kv_heads = {self.num_kv_heads} must divide num_heads = "
                              f"{self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"ModelConfig.top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        for name in ("rope_local", "rope_global"):
            rope = getattr(self, name)
            if rope.rope_type not in ROPE_TYPES:
                raise ConfigError(f"ModelConfig.{name}.rope_type = {rope.rope_type!r}; expected one of {ROPE_TYPES}")
            if not 0.0 < rope.partial_rotary_factor <= 1.0:
                raise ConfigError(f"ModelConfig.{name}.partial_rotary_factor must be in (0, 1], got "
                                  f"{rope.partial_rotary_factor}")
            if rope.rope_type == "default" and rope.partial_rotary_factor != 1.0:
                raise ConfigError(f"ModelConfig.{name}: partial_rotary_factor != 1 is only supported with "
                                  f"rope_type 'proportional'")
            if rope.theta <= 0 or rope.factor <= 0:
                raise ConfigError(f"ModelConfig.{name}.theta and .factor must be positive")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
            raise ConfigError(f"ModelConfig.final_logit_softcap must be positive or None, got "
                              f"{self.final_logit_softcap}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"ModelConfig.{name} = {value} is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_ids:
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"ModelConfig.eos_token_id {value} is outside the vocabulary")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ModelConfig.remat = {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.moe_impl not in MOE_IMPLEMENTATIONS:
            raise ConfigError(f"ModelConfig.moe_impl = {self.moe_impl!r}; expected one of {MOE_IMPLEMENTATIONS}")
        if self.moe_capacity_factor is not None:
            factor = self.moe_capacity_factor
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ConfigError(f"ModelConfig.moe_capacity_factor must be a positive number or None, got {factor!r}")
            if self.moe_impl != "expert_parallel":
                raise ConfigError(f"ModelConfig.moe_capacity_factor applies only to moe_impl 'expert_parallel' "
                                  f"(the other implementations are dropless), got moe_impl {self.moe_impl!r}")

    # -------------------------------------------------------------------------------------------- derived values
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def rope_for(self, layer_type: str) -> RopeConfig:
        return self.rope_global if layer_type == FULL else self.rope_local

    @property
    def layer_specs(self) -> tuple[tuple[str, int, int], ...]:
        """(type, head_dim, kv_heads) per layer: the only things that differ between layers."""
        return tuple(zip(self.layer_types, self.layer_head_dims, self.layer_kv_heads))

    @property
    def scan_period(self) -> int:
        """Smallest period P of the layer pattern that tiles the stack; layers are scanned in groups of P."""
        specs = self.layer_specs
        for period in range(1, self.num_layers + 1):
            if self.num_layers % period == 0 and all(specs[i] == specs[i % period] for i in range(self.num_layers)):
                return period
        return self.num_layers

    @property
    def scan_repeats(self) -> int:
        return self.num_layers // self.scan_period

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------- presets
    @classmethod
    def build(cls, *, num_layers: int, layer_types: tuple[str, ...] | None = None, global_head_dim: int | None = None,
              num_global_kv_heads: int | None = None, head_dim: int, num_kv_heads: int, **kwargs) -> "ModelConfig":
        """Fill the per-layer tuples the way transformers does: default 5:1 pattern with the last layer full,
        full layers using the global head dim / kv heads."""
        if layer_types is None:
            layer_types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers))
        layer_types = tuple(layer_types[:-1]) + (FULL,) if layer_types else layer_types
        global_head_dim = HF_DEFAULT_GLOBAL_HEAD_DIM if global_head_dim is None else global_head_dim
        global_kv = num_kv_heads if num_global_kv_heads is None else num_global_kv_heads
        head_dims = tuple(global_head_dim if t == FULL else head_dim for t in layer_types)
        kv_heads = tuple(global_kv if t == FULL else num_kv_heads for t in layer_types)
        return cls(num_layers=num_layers, layer_types=layer_types, layer_head_dims=head_dims,
                   layer_kv_heads=kv_heads, head_dim=head_dim, num_kv_heads=num_kv_heads, **kwargs)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A 7-layer model (two repeats would be 12; 7 keeps the default 5:1 pattern plus the forced-full last
        layer) small enough for CPU tests in seconds."""
        kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=7, num_heads=4, head_dim=16,
                      num_kv_heads=2, global_head_dim=32, num_global_kv_heads=1, sliding_window=8, num_experts=8,
                      top_k=2, moe_intermediate_size=32, canvas_length=16, max_position_embeddings=4096)
        kwargs.update(overrides)
        return cls.build(**kwargs)

    @classmethod
    def gemma4_26b_a4b(cls, **overrides) -> "ModelConfig":
        """The released DiffusionGemma 26B-A4B text stack (docs/ARCHITECTURE.md §2, 'The released 26B-A4B shape')."""
        kwargs = dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_layers=30, num_heads=16,
                      head_dim=256, num_kv_heads=8, global_head_dim=512, num_global_kv_heads=2, sliding_window=1024,
                      num_experts=128, top_k=8, moe_intermediate_size=704, canvas_length=256,
                      max_position_embeddings=262_144, eos_token_id=(1, 106, 50))
        kwargs.update(overrides)
        return cls.build(**kwargs)

    # --------------------------------------------------------------------------------------- HuggingFace format
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Read a DiffusionGemma `config.json` dict (outer config with `text_config`, or a bare text config)."""
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
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
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

        def rope_config(layer_type, default):
            params = rope.get(layer_type)
            if params is None:
                return default
            bad = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor", "factor"})
            if bad:
                raise ConfigError(f"{source}: text_config.rope_parameters.{layer_type} has unsupported field(s) {bad}")
            return RopeConfig(rope_type=params.get("rope_type", "default"), theta=float(params["rope_theta"]),
                              partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                              factor=float(params.get("factor", 1.0)))

        eos = get("eos_token_id")
        canvas = hf.get("canvas_length", 256) if "text_config" in hf else 256
        kwargs = dict(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
            num_layers=num_layers, num_heads=get("num_attention_heads"), head_dim=head_dim, num_kv_heads=kv,
            layer_types=layer_types, layer_head_dims=tuple(head_dims), layer_kv_heads=tuple(kv_heads),
            sliding_window=get("sliding_window"), num_experts=text["num_experts"], top_k=text["top_k_experts"],
            moe_intermediate_size=text["moe_intermediate_size"],
            rope_local=rope_config(SLIDING, RopeConfig(rope_type="default", theta=10_000.0)),
            rope_global=rope_config(FULL, RopeConfig(rope_type="proportional", theta=1_000_000.0,
                                                     partial_rotary_factor=0.25)),
            rms_norm_eps=float(get("rms_norm_eps")),
            final_logit_softcap=text.get("final_logit_softcapping", HF_DEFAULT_SOFTCAP),
            canvas_length=canvas, max_position_embeddings=get("max_position_embeddings"),
            pad_token_id=get("pad_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            bos_token_id=get("bos_token_id"), initializer_range=get("initializer_range"))
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str, **overrides) -> "ModelConfig":
        path = os.path.join(hf_dir, "config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json in the HuggingFace directory") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        return cls.from_hf_config(hf, source=path, **overrides)

    def to_hf_text_config(self) -> dict[str, Any]:
        width = len(str(self.num_layers - 1))
        per_layer = {}
        for i, (hd, kv) in enumerate(zip(self.layer_head_dims, self.layer_kv_heads)):
            override = {}
            if hd != self.head_dim:
                override["head_dim"] = hd
            if kv != self.num_kv_heads:
                override["num_key_value_heads"] = kv
            if override:
                per_layer[str(i).zfill(width)] = override
        text = {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "diffusion_gemma_text",
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_experts": self.num_experts,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "pad_token_id": self.pad_token_id,
            "per_layer_config": per_layer,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {FULL: self.rope_global.to_hf(), SLIDING: self.rope_local.to_hf()},
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": True,
            "top_k_experts": self.top_k,
            "use_bidirectional_attention": "vision",
            "vocab_size": self.vocab_size,
        }
        if self.final_logit_softcap != HF_DEFAULT_SOFTCAP:
            text["final_logit_softcapping"] = self.final_logit_softcap
        return dict(sorted(text.items()))

    def to_hf_config(self, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A full DiffusionGemma `config.json` dict. With `template` (the config.json this model was read from),
        every non-architectural field (vision tower, image token ids, ...) is carried over unchanged and text
        fields that we do not model keep their original form."""
        hf = copy.deepcopy(dict(template)) if template is not None else _default_outer_config()
        text = self.to_hf_text_config()
        if template is not None and "text_config" in template:
            original = template["text_config"]
            # Keep the original spelling of fields that carry the same meaning in another form.
            if "per_layer_config" not in original and _implicit_per_layer(self, original):
                del text["per_layer_config"]
            if "layer_types" not in original and tuple(
                    FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers - 1)) + (FULL,) == \
                    self.layer_types:
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
        if template is None or "canvas_length" in template or self.canvas_length != 256:
            hf["canvas_length"] = self.canvas_length
        return hf

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
        for name in ("rope_local", "rope_global"):
            if name in data:
                data[name] = RopeConfig(**data[name])
        for name in ("layer_types", "layer_head_dims", "layer_kv_heads"):
            if name in data:
                data[name] = tuple(data[name])
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = tuple(data["eos_token_id"])
        return cls(**data)


registry.MODEL_PRESETS.register("tiny", ModelConfig.tiny)
registry.MODEL_PRESETS.register("gemma4_26b_a4b", ModelConfig.gemma4_26b_a4b)


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
    return {FULL: RopeConfig(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25).to_hf(),
            SLIDING: RopeConfig(rope_type="default", theta=10_000.0).to_hf()}


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
