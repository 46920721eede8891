"""Sudoku puzzle sets to evaluate on: a puzzle file with an optional line-aligned solution file, or generated
held-out puzzles. Solutions are checked against their puzzles up front, so a mismatched pair of files fails
with the file and line instead of scoring a model against the wrong boards."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from diffusion_gemma.data import sudoku


@dataclasses.dataclass(frozen=True)
class PuzzleSet:
    """name (what reports call it: the puzzle file as given, or a description of the generated set); puzzles
    [N, 9, 9]; solutions [N, 9, 9] or None (the solver's are used); source / solutions_source: the files."""

    name: str
    puzzles: np.ndarray
    solutions: np.ndarray | None
    source: str
    solutions_source: str | None = None

    def __len__(self) -> int:
        return len(self.puzzles)


def load_set(puzzles_path: str, solutions_path: str | None = None, *, limit: int | None = None) -> PuzzleSet:
    """A puzzle file (any format `sudoku.read_grids` reads) and its solutions (one per puzzle, same order);
    only the first `limit` puzzles when given."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    entries = _read(puzzles_path)[:limit]
    if not entries:
        raise ValueError(f"{puzzles_path}: no puzzles in the file")
    puzzles = np.stack([grid for _, grid in entries])
    solutions = None
    if solutions_path is not None:
        answers = _read(solutions_path)
        if len(answers) < len(entries) or (limit is None and len(answers) != len(entries)):
            raise ValueError(f"{solutions_path}: {len(answers)} solutions for the {len(entries)} puzzles of "
                             f"{puzzles_path}; expected one solution per puzzle, in the same order")
        answers = answers[: len(entries)]
        for (puzzle_line, puzzle), (line, solution) in zip(entries, answers):
            _check_solution(puzzle, solution, f"{solutions_path}:{line}", f"{puzzles_path}:{puzzle_line}")
        solutions = np.stack([grid for _, grid in answers])
    # Named by the path as given: files of the same name in different directories stay apart.
    return PuzzleSet(os.fspath(puzzles_path), puzzles, solutions, os.fspath(puzzles_path), solutions_path)


def generated_set(count: int, *, seed: int, min_givens: int, max_givens: int) -> PuzzleSet:
    """`count` puzzles from the EVAL side of the split rule (never trained on), with their solutions."""
    from diffusion_gemma.evaluation.sudoku import eval_puzzles

    if count <= 0:
        raise ValueError(f"the number of generated puzzles must be positive, got {count}")
    puzzles, solutions = eval_puzzles(count, seed=seed, min_givens=min_givens, max_givens=max_givens)
    name = f"generated-{count}-givens{min_givens}-{max_givens}-seed{seed}"
    return PuzzleSet(name, puzzles, solutions, name)


def _read(path: str) -> list[tuple[int, np.ndarray]]:
    try:
        return sudoku.read_grids(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such puzzle file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def _check_solution(puzzle: np.ndarray, solution: np.ndarray, where: str, puzzle_where: str) -> None:
    result = sudoku.validate(puzzle, solution)
    if not result.complete:
        raise ValueError(f"{where}: the solution has blank cells")
    if not result.units_valid:
        raise ValueError(f"{where}: the solution breaks the Sudoku rules ({result.num_violations} repeated digits)")
    if not result.givens_preserved:
        raise ValueError(f"{where}: the solution changes {result.num_changed_givens} given(s) of the puzzle at "
                         f"{puzzle_where}")
