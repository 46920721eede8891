"""Clamped givens: the answer positions a puzzle's givens fix, for training (`SudokuDataOptions.clamp_givens`,
kept clean and unscored) and for sampling (written into the canvas, never resampled).

Only the compact format has them at fixed places (answer token i is cell i); the chat format's answer is text
whose token positions depend on the tokenizer, so it is refused.
"""

from __future__ import annotations

import numpy as np

from diffusion_gemma.tasks.sudoku.formats import CompactFormat, SudokuFormat


def check_format(fmt: SudokuFormat | str) -> None:
    name = fmt if isinstance(fmt, str) else ("compact" if isinstance(fmt, CompactFormat) else type(fmt).__name__)
    if name != "compact":
        raise ValueError(f"clamp_givens needs the compact format (answer token i is cell i), not {name!r}")


def given_positions(fmt: SudokuFormat, puzzle) -> np.ndarray:
    """Answer positions (0 = the answer's first token) of the puzzle's givens, ascending."""
    check_format(fmt)
    return np.flatnonzero(np.asarray(puzzle).reshape(-1))


def givens_clamp(fmt: SudokuFormat, puzzles, width: int) -> tuple[np.ndarray, np.ndarray]:
    """puzzles [N, 9, 9] -> (clamp_ids, clamp_mask) [N, width] for `sampler.generate`: each given's answer token
    at its cell's position."""
    check_format(fmt)
    puzzles = np.asarray(puzzles).reshape(-1, 81)
    if width < puzzles.shape[1]:
        raise ValueError(f"{width} generated tokens cannot hold the 81 cells")
    ids = np.zeros((len(puzzles), width), np.int32)
    mask = np.zeros((len(puzzles), width), bool)
    ids[:, :81] = [fmt.answer_ids(np.where(p > 0, p, 1)) for p in puzzles]
    mask[:, :81] = puzzles > 0
    return ids, mask
