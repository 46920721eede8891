"""The Sudoku experiment, the toolkit's main job: train a small DiffusionGemma from scratch on generated puzzles.

  python -m diffusion_gemma.train --config=configs/sudoku.py --workdir=/tmp/sudoku

The default is CPU-sized: the tiny 7-layer model (shared stack, MoE) on the compact character format (prompt =
`<bos>` + 81 puzzle cells, canvas = the 81 solution cells), puzzles with 30-50 givens generated on the fly from
the training side of the split rule (the public benchmark sets are never used for training).
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant:
        raise ValueError(f"unknown variant {variant!r} of configs/sudoku.py (none yet)")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_steps = 300
    config.grad_accum_steps = 1
    config.log_every = 25
    config.freeze_router = False  # from scratch: the router must learn too
    config.model = dict(preset="tiny", overrides={"vocab_size": 16, "canvas_length": 81}, dtype="float32",
                        param_dtype="float32", remat="none", init_hf_dir="", init_checkpoint="")
    config.optimizer = dict(learning_rate=3e-3, end_learning_rate=3e-4, warmup_steps=20, b1=0.95, b2=0.99,
                            eps=1e-8, weight_decay=1e-4, clip_norm=1.0)
    config.lora = dict(enabled=False)
    config.data = dict(source="sudoku", seq_length=163, block_size=81, global_batch_size=16, shuffle_seed=0,
                       num_synthetic_examples=4800, sudoku_min_givens=30, sudoku_max_givens=50)
    config.objective = dict(noise_eps=1e-3, self_conditioning_probability=0.5, ar_weight=1.0)
    config.mesh = dict(data=-1, expert=1)
    config.checkpoint = dict(every_steps=100, keep=2, async_save=True)
    return ml_collections.ConfigDict(config)
