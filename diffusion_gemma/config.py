"""The model configuration: every architectural knob of DiffusionGemma in one frozen dataclass.

`ModelConfig` is what library code sees: validated when built, with derived values (scan period, per-layer
specs) and the named presets. HuggingFace `config.json` files are converted at the edge, exactly, by
`diffusion_gemma/checkpoints/hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping

from diffusion_gemma import registry

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional")
# "expert_parallel*" run under a mesh with an 'expert' axis (diffusion_gemma/model/expert_parallel.py).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_IMPLEMENTATIONS = ("grouped", "dense", "expert_parallel", "expert_parallel_ragged")
DTYPES = ("float32", "bfloat16", "float16")

# transformers' global head dim when a config.json does not give one (the full layers' head dim).
HF_DEFAULT_GLOBAL_HEAD_DIM = 512


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


DEFAULT_ROPE_LOCAL = RopeConfig(rope_type="default", theta=10_000.0)
DEFAULT_ROPE_GLOBAL = RopeConfig(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25)


GRID_AXES = ("position", "segment", "row", "col", "block")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridRope:
    """Cell geometry through the rotary, for sequences laid out as [prefix ; grid ; grid ; ...] with each grid's
    `rows x cols` cells row-major (e.g. a prompt grid followed by the answer grid on the canvas).

    A token's coordinates are a function of its 1-D position p alone, so every API keeps taking positions:
    prefix tokens (p < prefix_length) are segment 0 with row = col = block = 0; from there on, with
    c = p - prefix_length, cell = c mod (rows * cols), segment = 1 + c // (rows * cols), row and col the cell's,
    block the index of its `block_rows x block_cols` sub-rectangle (row-major). Position is p itself.

    On the layers whose type is in `layer_types`, a head's rotary pairs are split among GRID_AXES in proportion
    to the `*_share` fields (contiguous groups in that order) and each group turns with its own coordinate, so
    q.k depends only on the coordinate differences: "same row / column / block" and "the same cell one grid
    back" are fixed relative rotations, not something the model must infer from absolute positions. The k
    pairs of an axis with period P (segments, rows, cols, number of blocks) turn by 2 pi j / P per unit,
    j = 1..k: harmonics of one turn over the axis, so an offset of 0 is the only one (within the axis) that
    rotates no pair. The position group uses the layer's own `RopeConfig` frequencies over its 2k dims.
    Layers of other types keep their 1-D rotary. No parameters are added.
    """

    prefix_length: int
    rows: int
    cols: int
    block_rows: int
    block_cols: int
    segments: int = 3
    layer_types: tuple[str, ...] = (SLIDING,)
    position_share: int = 0
    segment_share: int = 1
    row_share: int = 1
    col_share: int = 1
    block_share: int = 1

    @property
    def shares(self) -> tuple[int, ...]:
        """The pair shares in GRID_AXES order."""
        return tuple(getattr(self, f"{axis}_share") for axis in GRID_AXES)

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def num_blocks(self) -> int:
        return (self.rows // self.block_rows) * (self.cols // self.block_cols)

    def periods(self) -> dict[str, int]:
        """The period of each axis but position: its number of distinct coordinates."""
        return {"segment": self.segments, "row": self.rows, "col": self.cols, "block": self.num_blocks}

    def pairs(self, head_dim: int) -> tuple[int, ...]:
        """Rotary pairs of each axis (GRID_AXES order) for a head of `head_dim` dims (validated to divide)."""
        total = sum(self.shares)
        return tuple(share * (head_dim // 2) // total for share in self.shares)

    def validate(self, where: str = "GridRope") -> None:
        for name in ("rows", "cols", "block_rows", "block_cols", "segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
        for name in ("prefix_length",) + tuple(f"{axis}_share" for axis in GRID_AXES):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}.{name} must be a non-negative integer, got {value!r}")
        for name, size in (("block_rows", "rows"), ("block_cols", "cols")):
            if getattr(self, size) % getattr(self, name):
                raise ConfigError(f"{where}.{name} = {getattr(self, name)} must divide {size} = "
                                  f"{getattr(self, size)}")
        if not sum(self.shares):
            raise ConfigError(f"{where}: every *_share is 0; give at least one axis rotary pairs")
        if not isinstance(self.layer_types, tuple) or not self.layer_types:
            raise ConfigError(f"{where}.layer_types must be a non-empty tuple of {LAYER_TYPES}, got "
                              f"{self.layer_types!r}")
        for layer_type in self.layer_types:
            if layer_type not in LAYER_TYPES:
                raise ConfigError(f"{where}.layer_types has {layer_type!r}; expected some of {LAYER_TYPES}")

    @classmethod
    def from_mapping(cls, value: Mapping, where: str) -> "GridRope":
        """A plain dict (config files, model_config.json) -> GridRope; unknown keys name the field."""
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; valid: "
                              f"{sorted(f.name for f in dataclasses.fields(cls))}")
        value = dict(value)
        if isinstance(value.get("layer_types"), list):
            value["layer_types"] = tuple(value["layer_types"])
        try:
            return cls(**value)
        except TypeError as err:  # a required field left out
            raise ConfigError(f"{where}: {err}") from None


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """transformers' default pattern: every sixth layer full, the others sliding, and the last layer full."""
    if num_layers <= 0:
        return ()
    return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers - 1)) + (FULL,)


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
    rope_local: RopeConfig = DEFAULT_ROPE_LOCAL
    rope_global: RopeConfig = DEFAULT_ROPE_GLOBAL
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
    # Cell geometry in the rotary of some layer types (GridRope); None = the 1-D rotary everywhere.
    grid_rope: GridRope | None = None

    def __post_init__(self):
        # Config files (ml-collections) can only carry plain dicts; turn them into RopeConfig here.
        for name in ("rope_local", "rope_global"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                unknown = sorted(set(value) - {f.name for f in dataclasses.fields(RopeConfig)})
                if unknown:
                    raise ConfigError(f"ModelConfig.{name}: unknown field(s) {unknown}")
                object.__setattr__(self, name, RopeConfig(**value))
        if isinstance(self.grid_rope, Mapping):
            object.__setattr__(self, "grid_rope", GridRope.from_mapping(self.grid_rope, "ModelConfig.grid_rope"))
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
        if self.grid_rope is not None:
            self._validate_grid_rope()

    def _validate_grid_rope(self) -> None:
        grid, where = self.grid_rope, "ModelConfig.grid_rope"
        if not isinstance(grid, GridRope):
            raise ConfigError(f"{where} must be a GridRope, a dict of its fields or None, got "
                              f"{type(grid).__name__}")
        grid.validate(where)
        layers = [i for i, layer_type in enumerate(self.layer_types) if layer_type in grid.layer_types]
        if not layers:
            raise ConfigError(f"{where}.layer_types = {grid.layer_types} matches no layer of layer_types")
        total = sum(grid.shares)
        for i in layers:
            pairs = self.layer_head_dims[i] // 2
            if pairs % total:
                shares = ", ".join(f"{axis} {share}" for axis, share in zip(GRID_AXES, grid.shares))
                raise ConfigError(f"{where}: layer_head_dims[{i}] = {self.layer_head_dims[i]} has {pairs} rotary "
                                  f"pairs, not a multiple of the shares' total {total} ({shares})")

    # -------------------------------------------------------------------------------------------- derived values
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def rope_for(self, layer_type: str) -> RopeConfig:
        return self.rope_global if layer_type == FULL else self.rope_local

    def grid_rope_for(self, layer_type: str) -> GridRope | None:
        """The cell geometry the rotary of this layer type uses, None for the plain 1-D rotary."""
        grid = self.grid_rope
        return grid if grid is not None and layer_type in grid.layer_types else None

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
            layer_types = default_layer_types(num_layers)
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

    # ----------------------------------------------------------------- our own JSON form (checkpoint metadata)
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

