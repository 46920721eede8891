"""`sudoku_small`: the released architecture sized for Sudoku from scratch."""

from __future__ import annotations

from diffusion_gemma.config import ModelConfig, RopeConfig


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
