"""Sudoku puzzle sets to evaluate on: a puzzle file with an optional line-aligned solution file, or generated
held-out puzzles.

Every puzzle of a file is checked when the set is loaded: givens that break a row / column / box rule, no
solution, several solutions, or a listed solution that is not a valid completion of its puzzle. A model scored
on such a puzzle is measured against a question without one answer (or against the wrong answer), so by default
the first problem fails the load with its file and line; `allow_invalid=True` keeps the puzzles and lists them
in `PuzzleSet.invalid` for the report (a wrong listed solution is then replaced by the solver's for scoring)."""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np

from diffusion_gemma.tasks.sudoku import puzzles as sudoku


class InvalidPuzzleError(ValueError):
    """A puzzle (or its listed solution) that cannot be scored fairly; the message names the file and line."""


class InvalidPuzzle(NamedTuple):
    """A puzzle kept under `allow_invalid`: its index in the set and `where: what is wrong`."""

    index: int
    problem: str


@dataclasses.dataclass(frozen=True)
class PuzzleSet:
    """name (what reports call it: the puzzle file as given, or a description of the generated set); puzzles
    [N, 9, 9]; solutions [N, 9, 9] or None (the solver's are used); source / solutions_source: the files;
    invalid: the puzzles with a problem that are scored anyway (only under `allow_invalid`)."""

    name: str
    puzzles: np.ndarray
    solutions: np.ndarray | None
    source: str
    solutions_source: str | None = None
    invalid: tuple[InvalidPuzzle, ...] = ()

    def __len__(self) -> int:
        return len(self.puzzles)


def load_set(puzzles_path: str, solutions_path: str | None = None, *, limit: int | None = None,
             allow_invalid: bool = False) -> PuzzleSet:
    """A puzzle file (any format `sudoku.read_grids` reads) and its solutions (one per puzzle, same order);
    only the first `limit` puzzles when given. Raises `InvalidPuzzleError` for the first puzzle with a problem
    (module docstring) unless `allow_invalid`."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    entries = _read(puzzles_path)[:limit]
    if not entries:
        raise ValueError(f"{puzzles_path}: no puzzles in the file")
    answers = None
    if solutions_path is not None:
        answers = _read(solutions_path)
        if len(answers) < len(entries) or (limit is None and len(answers) != len(entries)):
            raise ValueError(f"{solutions_path}: {len(answers)} solutions for the {len(entries)} puzzles of "
                             f"{puzzles_path}; expected one solution per puzzle, in the same order")
        answers = answers[: len(entries)]
    invalid, wrong_solutions = [], []
    for index, (line, puzzle) in enumerate(entries):
        what = puzzle_problem(puzzle)
        problem = None if what is None else f"{puzzles_path}:{line}: {what}"
        if problem is None and answers is not None:
            what = solution_problem(puzzle, answers[index][1])
            if what is not None:
                wrong_solutions.append(index)
                problem = f"{solutions_path}:{answers[index][0]}: {what} (puzzle {puzzles_path}:{line})"
        if problem is not None:
            invalid.append(InvalidPuzzle(index, problem))
    if invalid and not allow_invalid:
        more = f" (and {len(invalid) - 1} more invalid puzzle(s) in the file)" if len(invalid) > 1 else ""
        raise InvalidPuzzleError(invalid[0].problem + more)
    puzzles = np.stack([grid for _, grid in entries])
    solutions = None if answers is None else np.stack([grid for _, grid in answers])
    for index in wrong_solutions:  # the puzzle itself is sound: score it against its one true solution
        solutions[index] = sudoku.solve(puzzles[index])
    # Named by the path as given: files of the same name in different directories stay apart.
    return PuzzleSet(os.fspath(puzzles_path), puzzles, solutions, os.fspath(puzzles_path), solutions_path,
                     tuple(invalid))


def puzzle_problem(puzzle) -> str | None:
    """What makes `puzzle` unfit to score a model on (a rule-breaking given, no solution, several solutions),
    or None. One solver search counted up to two solutions; the givens are only inspected when it finds none."""
    count = sudoku.count_solutions(puzzle, limit=2)
    if count == 1:
        return None
    if count > 1:
        return "the puzzle has more than one solution"
    clash = _repeated_given(np.asarray(puzzle).reshape(9, 9))
    return f"the givens break the Sudoku rules: {clash}" if clash else "the puzzle has no solution"


def solution_problem(puzzle, solution) -> str | None:
    """Why `solution` is not a valid completion of `puzzle`, or None."""
    result = sudoku.validate(puzzle, solution)
    if not result.complete:
        return "the solution has blank cells"
    if not result.units_valid:
        return f"the solution breaks the Sudoku rules ({result.num_violations} repeated digits)"
    if not result.givens_preserved:
        return f"the solution changes {result.num_changed_givens} given(s)"
    return None


def _repeated_given(grid: np.ndarray) -> str | None:
    """'digit D twice in row R' (or column / box, numbered 1-9 left to right, top to bottom) for the first
    repeat, or None."""
    boxes = grid.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    for kind, units in (("row", grid), ("column", grid.T), ("box", boxes)):
        for number, unit in enumerate(units, 1):
            counts = np.bincount(unit, minlength=10)[1:]
            repeated = np.flatnonzero(counts > 1)
            if len(repeated):
                digit = int(repeated[0]) + 1
                return f"digit {digit} appears {counts[digit - 1]} times in {kind} {number}"
    return None


def generated_set(count: int, *, seed: int, min_givens: int, max_givens: int) -> PuzzleSet:
    """`count` puzzles from the EVAL side of the split rule (never trained on), with their solutions."""
    from diffusion_gemma.tasks.sudoku.evaluation import eval_puzzles

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
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a puzzle file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
