"""Sudoku as a task: puzzles (generator, solver, validator, split rule), prompt formats, the training source,
the training-time evaluator, scoring and the evaluation CLI's pieces, puzzle-set readers, plots and the
`sudoku_small` model preset.

Importing this package registers the `sudoku` data source (`data.options`: `source.SudokuDataOptions`), the
`sudoku` evaluation kind (`evaluation.options`: `evaluator.SudokuEvalOptions`) and the `sudoku_small` preset.
"""

from diffusion_gemma import registry
from diffusion_gemma.tasks.sudoku import evaluator, preset, source

registry.DATA_SOURCES.register("sudoku", registry.DataSource(
    build=source.build, check=lambda options, where: registry.check_options(options, source.SudokuDataOptions,
                                                                            where=where),
    own_tokenizer=source.own_tokenizer, renders_text=source.renders_text))
registry.EVALUATORS.register("sudoku", registry.EvaluatorKind(
    build=evaluator.build, check=lambda options, where: registry.check_options(options, evaluator.SudokuEvalOptions,
                                                                               where=where)))
registry.MODEL_PRESETS.register("sudoku_small", preset.sudoku_small)
