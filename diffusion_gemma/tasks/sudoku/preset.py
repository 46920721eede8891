"""`sudoku_small`: the released architecture sized for Sudoku from scratch; `compact_grid_rope`: the cell
geometry of the compact format's layout, for a model config to opt into."""

from __future__ import annotations

from diffusion_gemma.config import GridRope, ModelConfig, RopeConfig
from diffusion_gemma.tasks.sudoku.formats import CompactFormat


def sudoku_small(**overrides) -> ModelConfig:
    """The released architecture (shared stack, 5:1 sliding/full pattern, top-k MoE, self-conditioning) sized
    for about one accelerator-hour from scratch: 12 layers, width 192, 8 experts top-2, ~11M parameters. The
    compact format's vocabulary (16) and one 81-cell canvas; the window covers the whole 163-token sequence,
    since constraints link distant cells. Full layers rotate every dim starting at a 9-position period (one
    board row; `RopeConfig.first_period`), so same-column cells are one rotation apart."""
    kwargs = dict(vocab_size=16, hidden_size=192, intermediate_size=384, num_layers=12, num_heads=6,
                  head_dim=32, num_kv_heads=2, global_head_dim=64, num_global_kv_heads=1, sliding_window=256,
                  num_experts=8, top_k=2, moe_intermediate_size=128, canvas_length=81,
                  max_position_embeddings=512, eos_token_id=(1,), pad_token_id=0, bos_token_id=2,
                  rope_global=RopeConfig.first_period(9, 64))
    kwargs.update(overrides)
    return ModelConfig.build(**kwargs)


def compact_grid_rope(**overrides) -> GridRope:
    """`ModelConfig.grid_rope` for the compact layout: `<bos>`, the puzzle's 81 cells, then the canvas's 81
    solution cells, each board row-major with 3x3 boxes. The sliding layers' rotary then turns with each cell's
    segment (prefix / puzzle / answer), row, column and box (equal shares); full layers keep their 1-D rotary.
    In a config file: `overrides={"grid_rope": dataclasses.asdict(compact_grid_rope())}`."""
    cells = CompactFormat.ANSWER_LENGTH
    kwargs = dict(prefix_length=CompactFormat.PROMPT_LENGTH - cells, rows=9, cols=9, block_rows=3, block_cols=3,
                  segments=3)
    kwargs.update(overrides)
    return GridRope(**kwargs)
