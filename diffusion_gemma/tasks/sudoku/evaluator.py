"""The `sudoku` evaluation kind of a training run: solve `evaluation.num_examples` held-out puzzles (the EVAL side
of the split rule, fixed by `evaluation.seed`) with the block-diffusion sampler and score them (solve rate,
blank-cell accuracy, denoising steps) overall and by givens bucket."""

from __future__ import annotations

import dataclasses

from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval
from diffusion_gemma.tasks.sudoku.formats import make_format
from diffusion_gemma.tasks.sudoku.source import options_of
from diffusion_gemma.training.evaluation import sampler_settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class SudokuEvalOptions:
    """`evaluation.options` of the `sudoku` kind: the givens range of the held-out puzzles."""

    min_givens: int = 30
    max_givens: int = 50

    def __post_init__(self):
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= min_givens <= max_givens <= 81, got {self.min_givens}, "
                             f"{self.max_givens}")


def build(config, data_config, tokenizer, workdir: str):
    """The prompt format, and whether givens are clamped in the canvas, are the training data's
    (`data.options.format`, `data.options.clamp_givens`)."""
    options = SudokuEvalOptions(**dict(config.options))
    data_options = options_of(data_config) if data_config.source == "sudoku" else None
    fmt = make_format(data_options.format if data_options else "compact", tokenizer)
    clamp = bool(data_options and data_options.clamp_givens)  # a model trained with clamped givens is sampled so
    puzzles, solutions = sudoku_eval.eval_puzzles(config.num_examples, seed=config.seed,
                                                  min_givens=options.min_givens, max_givens=options.max_givens)

    def evaluate(model, step: int, should_stop=None) -> dict | None:
        sampler = sudoku_eval.sampler_config(fmt, model.config.canvas_length, **sampler_settings(config))
        try:
            answers = sudoku_eval.solve_diffusion(model, puzzles, fmt, sampler, batch_size=config.batch_size,
                                                  seed=config.seed, should_stop=should_stop, clamp_givens=clamp)
        except sudoku_eval.Stopped:
            return None
        report = sudoku_eval.score(puzzles, answers, solutions)
        out = {}
        for bucket, values in report.items():
            prefix = "" if bucket == "all" else f"{bucket}/"
            for name in ("solve_rate", "blank_cell_accuracy", "mean_forwards"):
                out[f"{prefix}{name}"] = values[name]
        return out

    return evaluate
