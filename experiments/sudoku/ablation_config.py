"""300-step A/B variants of the CPU Sudoku recipe (configs/sudoku.py:row_rope, the default before the cell geometry),
one mutation per `+`-joined name.

  taskset -c 0 python -m diffusion_gemma.train --config=experiments/sudoku/ablation_config.py:gemma_rope \\
      --workdir=/tmp/sudoku_ab/gemma_rope
  python experiments/sudoku/ablation_table.py /tmp/sudoku_ab/*

Names: `gemma_rope` (Gemma's rotary everywhere: the recipe before the row-period change), `row_rope` (the default:
full layers rotate every dim from a 9-position period), `row_rope_local` (Gemma's full layers, sliding layers with
the row period), `row_rope_both`, `arX` (AR weight X), `ar_answer` (the AR co-loss predicts the
answer's tokens only: `objective.ar_targets = "response"`), `lrX` (peak lr X, end lr X/10), `wN` (hidden N, heads of
N/4, experts of N/2), `grid` (the cell-geometry rotary of `configs/sudoku.py:grid`), `clamp` (givens' canvas cells
clean and unscored: `data.options.clamp_givens`), `poolK` (K base puzzles per givens count, augmented by a random
symmetry per example), `curriculum` (many givens first, down to 30 late), `curriculum20` (down to 20
givens: `configs/sudoku.py`'s GIVENS_CURRICULUM, with a pool), `bsN` (global batch N), `stepsN` (N
steps instead of 300, evaluated at the middle and the end). Every variant evaluates on the default's 128 held-out
easy puzzles.
"""

import dataclasses
import importlib.util
import os

from diffusion_gemma.config import RopeConfig
from diffusion_gemma.tasks.sudoku.preset import compact_grid_rope

_SPEC = importlib.util.spec_from_file_location(
    "sudoku_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sudoku.py"))
_SUDOKU = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_SUDOKU)

NUM_STEPS = 300
GEMMA_LOCAL = RopeConfig(rope_type="default", theta=10_000.0)
GEMMA_GLOBAL = RopeConfig(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25)


def _rope(overrides, *, local: RopeConfig, global_: RopeConfig) -> None:
    overrides.update(rope_local=dataclasses.asdict(local), rope_global=dataclasses.asdict(global_))


def get_config(variant: str = "row_rope"):
    config = _SUDOKU.get_config("row_rope")  # the recipe these A/Bs started from: 1-D rotary, no cell geometry
    config.num_steps = NUM_STEPS
    config.evaluation.every_steps = NUM_STEPS
    config.checkpoint.every_steps = NUM_STEPS
    overrides = config.model.overrides
    for part in variant.split("+"):
        if part == "row_rope":
            pass  # the default
        elif part == "gemma_rope":
            _rope(overrides, local=GEMMA_LOCAL, global_=GEMMA_GLOBAL)
        elif part == "row_rope_local":
            _rope(overrides, local=RopeConfig.first_period(9, 16), global_=GEMMA_GLOBAL)
        elif part == "row_rope_both":
            _rope(overrides, local=RopeConfig.first_period(9, 16), global_=RopeConfig.first_period(9, 32))
        elif part == "ar_answer":
            config.objective.ar_targets = "response"
        elif part.startswith("ar"):
            config.objective.ar_weight = float(part[2:])
        elif part.startswith("lr"):
            config.optimizer.learning_rate = float(part[2:])
            config.optimizer.end_learning_rate = float(part[2:]) / 10
        elif part.startswith("w"):
            width = int(part[1:])
            overrides.update(hidden_size=width, intermediate_size=2 * width, moe_intermediate_size=width // 2,
                             head_dim=width // 4, global_head_dim=width // 2)
            if "rope_global" in overrides and overrides["rope_global"]["rope_type"] == "default":
                overrides["rope_global"] = dataclasses.asdict(RopeConfig.first_period(9, width // 2))
        elif part == "grid":
            overrides["grid_rope"] = dataclasses.asdict(compact_grid_rope())
        elif part == "clamp":
            config.data.options.clamp_givens = True
        elif part.startswith("pool"):
            config.data.options.update(pool_per_givens=int(part[4:]), augment=True)
        elif part == "curriculum":
            config.data.options.curriculum = ((0.0, 45, 60), (0.3, 35, 60), (0.6, 30, 60))
        elif part == "curriculum20":  # down to the generator's floor: needs a pool (`poolK`)
            config.data.options.curriculum = _SUDOKU.GIVENS_CURRICULUM
        elif part.startswith("bs"):
            config.data.global_batch_size = int(part[2:])
        elif part.startswith("steps"):
            steps = int(part[5:])
            config.num_steps = steps
            config.evaluation.every_steps = steps // 2
            config.checkpoint.every_steps = 200
        else:
            raise ValueError(f"experiments/sudoku/ablation_config.py: unknown variant part {part!r} in {variant!r}")
    if config.data.options.get("curriculum"):  # stage starts are fractions of the run (SudokuDataOptions)
        config.data.num_synthetic_examples = config.num_steps * config.data.global_batch_size
    return config
