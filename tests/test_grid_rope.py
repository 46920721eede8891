"""`ModelConfig.grid_rope`: cell geometry through the rotary (config.py `GridRope`, model/layers.py).

Proven here: the coordinates of a known layout; the pair frequencies; with the option off the rope tables are the
plain 1-D ones, and a geometry whose pairs all follow the position reproduces them and the model's logits bit for
bit; on a geometry layer the attention logit of two tokens depends only on their coordinate differences (so it
tells apart pairs that a 1-D rotary cannot: equal offsets, different rows), same-row pairs and "the same cell one
grid back" are fixed relative rotations; invalid configs name the field; a geometry model saves and loads through
our checkpoints, and the HuggingFace export refuses it (API and CLI) with one line saying why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma.checkpoints import orbax_io, streaming
from diffusion_gemma.checkpoints.hf_config import model_config_to_hf
from diffusion_gemma.config import FULL, GRID_AXES, SLIDING, ConfigError, GridRope, ModelConfig
from diffusion_gemma.model.layers import (apply_rope, grid_coordinates, grid_rope_cos_sin, grid_rope_frequencies,
                                          rope_cos_sin, rope_inv_freq)
from diffusion_gemma.model.transformer import DiffusionGemma

from cli_runs import REPO, cli_env

# [1 prefix token ; a 9x9 grid with 3x3 blocks ; the same grid again], as a prompt grid and an answer canvas.
GRID = GridRope(prefix_length=1, rows=9, cols=9, block_rows=3, block_cols=3)
SEQ = 1 + 2 * 81
HEAD_DIM = 16  # tiny's sliding head dim: 8 pairs, 2 per axis with equal shares


def _tiny(**overrides) -> ModelConfig:
    return ModelConfig.tiny(vocab_size=16, canvas_length=81, sliding_window=256, max_position_embeddings=512,
                            **overrides)


def _rotate(x: np.ndarray, cos, sin) -> np.ndarray:
    """x [S, hd] rotated at each of the S positions' tables [1, S, hd] (one head)."""
    return np.asarray(apply_rope(jnp.asarray(x)[None, :, None, :], cos, sin))[0, :, 0, :]


# ------------------------------------------------------------------------------------------------ coordinates
def test_coordinates_of_a_known_layout():
    positions = [-3, 0, 1, 9, 10, 41, 81, 82, 83, 162, 163]
    expected = [(-3, 0, 0, 0, 0),     # a left pad before the prefix
                (0, 0, 0, 0, 0),      # the prefix token
                (1, 1, 0, 0, 0),      # first cell of the first grid
                (9, 1, 0, 8, 2),      # end of row 0: top-right block
                (10, 1, 1, 0, 0),     # start of row 1
                (41, 1, 4, 4, 4),     # the centre cell, centre block
                (81, 1, 8, 8, 8),     # last cell of the first grid
                (82, 2, 0, 0, 0),     # the second grid starts over at cell 0
                (83, 2, 0, 1, 0),
                (162, 2, 8, 8, 8),
                (163, 3, 0, 0, 0)]    # a third grid, should the sequence go on
    np.testing.assert_array_equal(grid_coordinates(jnp.asarray(positions), GRID), expected)
    # A non-square grid with 1x3 blocks (one per row) and a 2-token prefix: rows and columns are not swapped.
    grid = GridRope(prefix_length=2, rows=2, cols=3, block_rows=1, block_cols=3)
    np.testing.assert_array_equal(grid_coordinates(jnp.arange(2, 10), grid),
                                  [(2, 1, 0, 0, 0), (3, 1, 0, 1, 0), (4, 1, 0, 2, 0), (5, 1, 1, 0, 1),
                                   (6, 1, 1, 1, 1), (7, 1, 1, 2, 1), (8, 2, 0, 0, 0), (9, 2, 0, 1, 0)])


def test_pair_frequencies_are_harmonics_of_each_axis_and_the_layers_own_for_position():
    rope = _tiny().rope_local
    axes, inv_freq = grid_rope_frequencies(GRID, rope, HEAD_DIM)
    np.testing.assert_array_equal(axes, [1, 1, 2, 2, 3, 3, 4, 4])  # segment, row, col, block; no position pairs
    periods = np.array([3, 3, 9, 9, 9, 9, 9, 9], np.float32)
    np.testing.assert_allclose(inv_freq, 2 * np.pi * np.array([1, 2] * 4) / periods, rtol=1e-6)
    mixed = dataclasses.replace(GRID, position_share=4)  # half the pairs on the 1-D position, one per other axis
    axes, inv_freq = grid_rope_frequencies(mixed, rope, HEAD_DIM)
    np.testing.assert_array_equal(axes, [0, 0, 0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(inv_freq[:4], rope_inv_freq(rope, 8))
    np.testing.assert_allclose(inv_freq[4:], 2 * np.pi / np.array([3, 9, 9, 9]), rtol=1e-6)


# ------------------------------------------------------------------------------------------ off = unchanged
def test_off_and_position_only_geometry_are_bit_identical_to_the_1d_rotary():
    """grid_rope=None builds the plain tables; a geometry whose pairs all follow the position (every other share
    0) must reproduce them and the model's logits exactly, which pins the geometry path to the 1-D one."""
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    position_only = dataclasses.replace(GRID, position_share=1, segment_share=0, row_share=0, col_share=0,
                                        block_share=0, layer_types=(SLIDING, FULL))
    ids = jax.random.randint(jax.random.key(0), (2, SEQ), 3, 13)
    canvas = jax.random.randint(jax.random.key(1), (2, 81), 3, 13)
    outputs = {}
    for name, grid in (("off", None), ("position_only", position_only), ("geometry", GRID)):
        model = DiffusionGemma(_tiny(grid_rope=grid), rngs=nnx.Rngs(0))  # no new parameters: the same weights
        tables = model._rope_tables(positions)
        for (layer_type, head_dim, _), (cos, sin) in zip(model.slot_specs(), tables):
            plain = rope_cos_sin(positions, rope_inv_freq(model.config.rope_for(layer_type), head_dim), jnp.float32)
            same = name != "geometry" or layer_type == FULL  # full layers keep their rotary under GRID
            assert (np.array_equal(cos, plain[0]) and np.array_equal(sin, plain[1])) == same, (name, layer_type)
        outputs[name] = np.asarray(model(ids, canvas))
    np.testing.assert_array_equal(outputs["position_only"], outputs["off"])
    assert np.isfinite(outputs["geometry"]).all()
    assert np.abs(outputs["geometry"] - outputs["off"]).max() > 1e-3  # the option does change the model


# ------------------------------------------------------------------------------------- what attention sees
def _logits_and_coordinates(grid: GridRope | None):
    """q.k of one head for every (query, key) pair of the layout, random q and k; and the coordinates."""
    positions = jnp.arange(SEQ, dtype=jnp.int32)[None]
    rope = _tiny().rope_local
    cos, sin = (rope_cos_sin(positions, rope_inv_freq(rope, HEAD_DIM), jnp.float32) if grid is None
                else grid_rope_cos_sin(positions, grid, rope, HEAD_DIM, jnp.float32))
    rng = np.random.default_rng(0)
    q = np.broadcast_to(rng.normal(size=HEAD_DIM).astype(np.float32), (SEQ, HEAD_DIM))
    k = np.broadcast_to(rng.normal(size=HEAD_DIM).astype(np.float32), (SEQ, HEAD_DIM))
    logits = _rotate(q, cos, sin) @ _rotate(k, cos, sin).T                                   # [query, key]
    return logits, np.asarray(grid_coordinates(positions[0], GRID))


def test_logit_depends_only_on_coordinate_differences():
    logits, coords = _logits_and_coordinates(GRID)
    deltas = coords[:, None, 1:] - coords[None, :, 1:]                                       # no position pairs
    groups: dict[tuple, list[float]] = {}
    for (i, j), delta in np.ndenumerate(deltas[..., 0]):
        groups.setdefault(tuple(deltas[i, j]), []).append(logits[i, j])
    spread = max(np.ptp(values) for values in groups.values())
    assert spread < 1e-4, spread
    # And each axis counts: from the centre cell, a step of one segment, row or column changes the logit.
    centre = 41
    steps = {"none": (centre, centre), "segment": (centre + 81, centre), "row": (centre + 9, centre),
             "col": (centre + 1, centre)}
    for name, (query, key) in steps.items():
        assert (deltas[query, key] != 0).sum() == (name != "none"), name
    values = [logits[pair] for pair in steps.values()]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-2

    # Equal 1-D offsets, different geometry: cell 0 -> 3 (same row) and cell 6 -> 9 (next row). The geometry tells
    # them apart; the plain rotary cannot.
    first, second = (1, 4), (7, 10)
    assert coords[4, 2] == coords[1, 2] and coords[10, 2] == coords[7, 2] + 1
    assert abs(logits[first] - logits[second]) > 1e-2
    plain, _ = _logits_and_coordinates(None)
    np.testing.assert_allclose(plain[first], plain[second], rtol=1e-5)


def test_same_row_and_own_given_are_fixed_relative_rotations():
    """The rotation from key to query (per pair, exp(i * angle)): every same-row pair leaves the row pairs
    unturned, wherever the row is; each canvas cell sees its own prompt cell at one rotation, for all 81 cells."""
    positions = jnp.arange(SEQ, dtype=jnp.int32)[None]
    cos, sin = grid_rope_cos_sin(positions, GRID, _tiny().rope_local, HEAD_DIM, jnp.float32)
    turn = np.asarray(cos[0, :, :HEAD_DIM // 2]) + 1j * np.asarray(sin[0, :, :HEAD_DIM // 2])  # [S, pairs]
    axes, _ = grid_rope_frequencies(GRID, _tiny().rope_local, HEAD_DIM)
    row_pairs = axes == GRID_AXES.index("row")
    coords = np.asarray(grid_coordinates(positions[0], GRID))
    for a in range(1, SEQ):
        for b in range(1, SEQ):
            if coords[a, 2] == coords[b, 2]:
                np.testing.assert_allclose(turn[a, row_pairs] * np.conj(turn[b, row_pairs]), 1.0, atol=1e-5)
    own_given = turn[82:] * np.conj(turn[1:82])                                             # canvas i vs prompt i
    np.testing.assert_allclose(own_given, np.broadcast_to(own_given[0], own_given.shape), atol=1e-5)
    segment_pairs = axes == GRID_AXES.index("segment")
    np.testing.assert_allclose(own_given[:, ~segment_pairs], 1.0, atol=1e-5)  # only the segment pairs turn
    assert np.abs(own_given[0, segment_pairs] - 1.0).min() > 0.5


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, message", [
    (dict(rows=0), r"ModelConfig.grid_rope.rows must be a positive integer"),
    (dict(block_rows=4), r"ModelConfig.grid_rope.block_rows = 4 must divide rows = 9"),
    (dict(prefix_length=-1), r"ModelConfig.grid_rope.prefix_length must be a non-negative integer"),
    (dict(row_share=-1), r"ModelConfig.grid_rope.row_share"),
    (dict(segment_share=0, row_share=0, col_share=0, block_share=0), r"every \*_share is 0"),
    (dict(layer_types=("local",)), r"ModelConfig.grid_rope.layer_types has 'local'"),
    (dict(layer_types=()), r"ModelConfig.grid_rope.layer_types must be a non-empty tuple"),
    (dict(segment_share=3), r"layer_head_dims\[0\] = 16 has 8 rotary pairs, not a multiple of the shares' total 6"),
])
def test_invalid_geometry_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(grid_rope=dataclasses.replace(GRID, **change))


def test_geometry_as_a_dict_and_its_mistakes():
    """Config files carry plain dicts (lists for tuples); typos and missing fields name the field."""
    as_dict = json.loads(json.dumps(dataclasses.asdict(GRID)))
    assert _tiny(grid_rope=as_dict).grid_rope == GRID
    with pytest.raises(ConfigError, match=r"ModelConfig.grid_rope: unknown field\(s\) \['rowz'\]"):
        _tiny(grid_rope=dict(as_dict, rowz=9))
    with pytest.raises(ConfigError, match=r"ModelConfig.grid_rope: .*missing.*'block_cols'"):
        _tiny(grid_rope={k: v for k, v in as_dict.items() if k != "block_cols"})
    with pytest.raises(ConfigError, match=r"ModelConfig.grid_rope.layer_types = \('sliding_attention',\) matches "
                                          "no layer"):
        _tiny(layer_types=(FULL,) * 7, grid_rope=GRID)
    with pytest.raises(ConfigError, match="ModelConfig.grid_rope must be a GridRope"):
        _tiny(grid_rope=9)


# ---------------------------------------------------------------------------------- checkpoints and export
@pytest.fixture(scope="module")
def geometry_checkpoint(tmp_path_factory):
    model = DiffusionGemma(_tiny(grid_rope=GRID), rngs=nnx.Rngs(3))
    path = str(tmp_path_factory.mktemp("grid_rope") / "ckpt")
    streaming.save_model(model, path)
    return model, path


def test_geometry_model_saves_and_loads(geometry_checkpoint):
    model, path = geometry_checkpoint
    assert ModelConfig.from_json(model.config.to_json()) == model.config
    with open(os.path.join(path, orbax_io.MODEL_CONFIG_FILE)) as f:
        assert json.load(f)["grid_rope"]["rows"] == 9
    loaded = orbax_io.load_model(path)
    assert loaded.config == model.config and loaded.config.grid_rope == GRID
    ids = jax.random.randint(jax.random.key(2), (1, 82), 3, 13)
    canvas = jax.random.randint(jax.random.key(3), (1, 81), 3, 13)
    np.testing.assert_array_equal(np.asarray(loaded(ids, canvas)), np.asarray(model(ids, canvas)))


def test_hf_export_refuses_a_geometry_model(geometry_checkpoint, tmp_path):
    from diffusion_gemma.checkpoints.export import export_model

    model, _ = geometry_checkpoint
    with pytest.raises(ConfigError, match=r"grid_rope.*HuggingFace config.json cannot express.*wrong positions"):
        model_config_to_hf(model.config)
    with pytest.raises(ConfigError, match="grid_rope"):
        export_model(model, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert "text_config" in model_config_to_hf(model.config.replace(grid_rope=None))  # the rest exports


@pytest.mark.slow
def test_convert_export_hf_refuses_a_geometry_checkpoint_in_one_line(geometry_checkpoint, tmp_path):
    _, path = geometry_checkpoint
    output = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "diffusion_gemma.convert", "export-hf", f"--checkpoint={path}",
                             f"--output={output}", "--noprogress"], cwd=REPO, env=cli_env(1), capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("convert: error: export-hf: ") and "grid_rope" in lines[0], lines[0]
    assert "per-axis rotary" in lines[0] and "Traceback" not in result.stderr
    assert not output.exists() and not [p for p in tmp_path.iterdir()]


# ------------------------------------------------------------------------------------------ a task's preset
def test_sudoku_compact_preset_lines_each_answer_cell_up_with_its_given():
    from diffusion_gemma.tasks.sudoku.formats import CompactFormat
    from diffusion_gemma.tasks.sudoku.preset import compact_grid_rope, sudoku_small

    grid = compact_grid_rope()
    assert grid == GRID
    total = CompactFormat.PROMPT_LENGTH + CompactFormat.ANSWER_LENGTH
    coords = np.asarray(grid_coordinates(jnp.arange(total), grid))
    np.testing.assert_array_equal(coords[0, 1:], [0, 0, 0, 0])                              # <bos>
    np.testing.assert_array_equal(coords[CompactFormat.PROMPT_LENGTH:, 2:], coords[1:CompactFormat.PROMPT_LENGTH, 2:])
    assert set(coords[1:82, 1]) == {1} and set(coords[82:, 1]) == {2}
    for model_config in (_tiny(grid_rope=dataclasses.asdict(grid)), sudoku_small(grid_rope=grid)):
        assert model_config.grid_rope == grid  # both widths split their sliding heads' pairs evenly


def test_the_sudoku_default_is_the_row_rope_variant_plus_the_geometry_and_a_longer_schedule():
    import importlib.util

    from diffusion_gemma.tasks.sudoku.preset import compact_grid_rope
    from diffusion_gemma.training.config import from_config_dict

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sudoku.py")
    spec = importlib.util.spec_from_file_location("sudoku_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    default, grid, row_rope = (from_config_dict(module.get_config(v)) for v in ("", "grid", "row_rope"))
    assert grid == default  # the A/B's name for it
    overrides = dict(default.model.overrides)
    geometry = overrides.pop("grid_rope")
    assert overrides == dict(row_rope.model.overrides)
    # ... and the longer schedule the geometry was measured with (row_rope keeps the 800 steps of its record).
    assert (default.num_steps, default.evaluation.every_steps, row_rope.num_steps) == (1200, 600, 800)
    assert dataclasses.replace(default, model=dataclasses.replace(default.model, overrides=overrides),
                               num_steps=800, evaluation=row_rope.evaluation) == row_rope
    assert dataclasses.replace(default.evaluation, every_steps=400) == row_rope.evaluation
    assert GridRope(**geometry) == compact_grid_rope()
