"""ModelConfig: presets, validation errors naming the field; and exact HuggingFace config.json round trips
(`checkpoints/hf_config.py`)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma import registry
from diffusion_gemma.checkpoints.hf_config import (model_config_from_hf, model_config_from_hf_dir, model_config_to_hf,
                                                  text_config_to_hf)
from diffusion_gemma.config import FULL, SLIDING, ConfigError, GridRope, ModelConfig, RopeConfig
from diffusion_gemma.model.layers import rope_inv_freq
from diffusion_gemma.model.transformer import DiffusionGemma

transformers = pytest.importorskip("transformers", reason="reference-parity dependency (pip install -e .[dev])")

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8)


def _hf_config_json(tmp_path, **text_overrides) -> dict:
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=4, num_experts=6, top_k_experts=2,
                moe_intermediate_size=16, max_position_embeddings=256, use_bidirectional_attention="vision")
    text.update(text_overrides)
    config = transformers.DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=8)
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


HF_VARIANTS = {
    "default_pattern_global_dims": dict(global_head_dim=16, num_global_key_value_heads=1),
    "two_global_kv_heads": dict(global_head_dim=16, num_global_key_value_heads=2),
    "global_head_dim_equals_head_dim": dict(global_head_dim=8),
    "full_layer_first": dict(num_hidden_layers=4, layer_types=[FULL, SLIDING, SLIDING, FULL], global_head_dim=16),
    "thirty_layers_zero_padded_keys": dict(num_hidden_layers=30, global_head_dim=16, num_global_key_value_heads=1),
    "softcap_and_rope_changed": dict(final_logit_softcapping=20.0, global_head_dim=16, rope_parameters={
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 50_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 5_000.0}}),
    "eos_list": dict(eos_token_id=[1, 106, 50], global_head_dim=16),
}


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_config_json_round_trips_unchanged(tmp_path, variant):
    hf = _hf_config_json(tmp_path, **HF_VARIANTS[variant])
    config = model_config_from_hf(hf)
    assert model_config_to_hf(config, template=hf) == hf


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_per_layer_shapes_match_transformers(tmp_path, variant):
    hf = _hf_config_json(tmp_path, **HF_VARIANTS[variant])
    config = model_config_from_hf(hf)
    reference = transformers.DiffusionGemmaConfig.from_pretrained(tmp_path).text_config
    assert list(config.layer_types) == list(reference.layer_types)
    for i in range(config.num_layers):
        assert config.layer_head_dims[i] == reference.per_layer_config[i].head_dim, i
        assert config.layer_kv_heads[i] == reference.per_layer_config[i].num_key_value_heads, i
    assert config.final_logit_softcap == reference.final_logit_softcapping
    assert config.canvas_length == 8


def test_config_without_per_layer_config_uses_global_head_dim_512():
    hf = {"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": {
        "num_hidden_layers": 6, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 8,
        "num_global_key_value_heads": 1}}
    config = model_config_from_hf(hf)
    assert config.layer_types == (SLIDING,) * 5 + (FULL,)
    assert config.layer_head_dims == (256,) * 5 + (512,)
    assert config.layer_kv_heads == (4,) * 5 + (1,)
    assert model_config_to_hf(config, template=hf) == hf


def test_last_layer_is_forced_full_like_the_reference(tmp_path):
    hf = _hf_config_json(tmp_path, num_hidden_layers=3, layer_types=[SLIDING] * 3)
    assert model_config_from_hf(hf).layer_types == (SLIDING, SLIDING, FULL)


@pytest.mark.parametrize("preset", ["tiny", "sudoku_small", "gemma4_26b_a4b"])
def test_preset_exported_config_loads_in_transformers_and_reads_back_equal(tmp_path, preset):
    config = registry.MODEL_PRESETS.get(preset)()
    hf = model_config_to_hf(config)
    hf["vision_config"] = TINY_VISION
    (tmp_path / "config.json").write_text(json.dumps(hf))
    reference = transformers.DiffusionGemmaConfig.from_pretrained(tmp_path)
    text = reference.text_config
    assert text.num_hidden_layers == config.num_layers
    assert [text.per_layer_config[i].head_dim for i in range(config.num_layers)] == list(config.layer_head_dims)
    assert [text.per_layer_config[i].num_key_value_heads for i in range(config.num_layers)] == \
        list(config.layer_kv_heads)
    assert reference.canvas_length == config.canvas_length
    assert model_config_from_hf(json.loads(reference.to_json_string())) == config


def test_released_preset_shape():
    config = ModelConfig.gemma4_26b_a4b()
    full = [i for i, t in enumerate(config.layer_types) if t == FULL]
    assert full == [5, 11, 17, 23, 29]
    assert {config.layer_head_dims[i] for i in full} == {512}
    assert {config.layer_kv_heads[i] for i in full} == {2}
    assert config.scan_period == 6 and config.scan_repeats == 5
    assert text_config_to_hf(config)["per_layer_config"] == {
        f"{i:02d}": {"head_dim": 512, "num_key_value_heads": 2} for i in full}


def test_released_preset_parameter_count_without_allocating():
    """nnx.eval_shape builds the 30-layer model abstractly: 25,250,986,752 text parameters."""
    config = ModelConfig.gemma4_26b_a4b()
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    d, v, layers, e, ie, i = 2816, 262_144, 30, 128, 704, 2112
    attention = 25 * (d * 16 * 256 * 2 + d * 8 * 256 * 2 + 2 * 256) + 5 * (d * 16 * 512 * 2 + d * 2 * 512 + 2 * 512)
    per_layer_rest = 7 * d + 3 * d * i + d * e + d + e + e * 3 * ie * d
    expected = v * d + d + (d + 3 * d * i) + attention + layers * per_layer_rest
    assert sum(leaf.size for leaf in leaves) == expected == 25_250_986_752


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 0, "num_heads"),
    ("top_k", 99, "top_k"),
    ("layer_types", ("sliding_attention",) * 7, "layer_types[-1]"),
    ("layer_kv_heads", (3,) * 7, "layer_kv_heads[0]"),
    ("layer_head_dims", (16,) * 6, "layer_head_dims"),
    ("dtype", "float8", "dtype"),
    ("moe_impl", "magic", "moe_impl"),
    ("pad_token_id", 10_000, "pad_token_id"),
])
def test_invalid_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dataclasses.replace(ModelConfig.tiny(), **{field: value})


def test_hf_config_errors_name_file_and_field(tmp_path):
    hf = _hf_config_json(tmp_path)
    bad = json.loads(json.dumps(hf))
    bad["text_config"]["per_layer_config"] = {"5": {"intermediate_size": 3}}
    with pytest.raises(ConfigError, match=r"my/config.json.*per_layer_config\['5'\].*intermediate_size"):
        model_config_from_hf(bad, source="my/config.json")
    bad = json.loads(json.dumps(hf))
    bad["text_config"]["attention_softcap_new_knob"] = 1
    with pytest.raises(ConfigError, match="attention_softcap_new_knob"):
        model_config_from_hf(bad)
    (tmp_path / "config.json").write_text('{"text_config": {\n "num_experts": 4,,}}')
    with pytest.raises(ConfigError, match=r"config.json: line 2"):
        model_config_from_hf_dir(str(tmp_path))


def test_json_round_trip_of_our_own_config():
    config = ModelConfig.gemma4_26b_a4b(dtype="bfloat16")
    assert ModelConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["grid_rope"] is None
    grid = GridRope(prefix_length=4, rows=2, cols=8, block_rows=2, block_cols=4, layer_types=(SLIDING, FULL),
                    position_share=1, segment_share=0)
    with_grid = ModelConfig.tiny(grid_rope=grid)
    assert ModelConfig.from_json(with_grid.to_json()) == with_grid and with_grid.grid_rope == grid
    with pytest.raises(ConfigError, match="hidden_sise"):
        ModelConfig.from_json(json.dumps({"hidden_sise": 3}))


def test_first_period_rope_turns_once_per_sudoku_row():
    """theta = (9 / 2pi) ** (head_dim / 2): pair 1 advances 2pi/9 per position, so positions 9 apart (same column
    of a row-major grid) get the same angle; every dim rotates (no pass-through)."""
    for head_dim in (32, 64):
        rope = RopeConfig.first_period(9, head_dim)
        inv_freq = rope_inv_freq(rope, head_dim)
        assert inv_freq.shape == (head_dim // 2,) and np.all(inv_freq > 0)
        np.testing.assert_allclose(inv_freq[:2], [1.0, 2 * np.pi / 9], rtol=1e-6)
        np.testing.assert_allclose(np.cos(inv_freq[1] * 81), 1.0, atol=1e-5)  # canvas cell -> its prompt cell
    assert registry.MODEL_PRESETS.get("sudoku_small")().rope_global == RopeConfig.first_period(9, 64)


def test_rope_given_as_plain_dict_becomes_rope_config_and_bad_keys_name_the_field():
    """Config files (ml-collections) carry dicts; ModelConfig turns them into RopeConfig and rejects typos."""
    config = ModelConfig.tiny(rope_global=dict(rope_type="default", theta=314.0, partial_rotary_factor=1.0))
    assert config.rope_global == RopeConfig(rope_type="default", theta=314.0)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match=r"rope_local.*thetta"):
        ModelConfig.tiny(rope_local=dict(thetta=5.0))
