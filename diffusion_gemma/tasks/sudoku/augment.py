"""Sudoku symmetries for data augmentation: one base puzzle becomes up to ~1.2e12 presentations.

The validity-preserving symmetries are digit relabelling, permuting the three bands (row triples) or the three
stacks (column triples), permuting the rows inside each band or the columns inside each stack, and transposing.
Each maps a valid board to a valid board, a unique puzzle to a unique puzzle with the same number of givens, and
keeps `puzzles.isomorphism_key` (hence the train/eval split) unchanged, so augmenting TRAIN puzzles never
produces an EVAL board.

A `Symmetry` is stored as a cell permutation plus a digit map, so applying, inverting and composing are single
numpy gathers on any number of boards at once. Pure numpy, deterministic from the `np.random.Generator` given.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("digits", "bands", "stacks", "rows", "columns", "transpose")
"""The independent parts of a random symmetry: `random_symmetry(rng, kinds)` draws only the ones named."""


@dataclasses.dataclass(frozen=True, eq=False)
class Symmetry:
    """`apply(boards)[..., cell] = digits[boards[..., cells[cell]]]` on flattened boards.

    cells: (81,) int, a permutation of the row-major cells (which input cell each output cell reads).
    digits: (10,) int, digits[0] = 0 (blanks stay blank) and digits[1:] a permutation of 1..9.
    """

    cells: np.ndarray
    digits: np.ndarray

    def apply(self, boards: np.ndarray) -> np.ndarray:
        """Boards of shape (..., 9, 9) (or (..., 81)) -> the same shape and dtype."""
        boards = np.asarray(boards)
        flat = boards.reshape(*boards.shape[:-2], 81) if boards.shape[-2:] == (9, 9) else boards
        if flat.shape[-1] != 81:
            raise ValueError(f"Sudoku boards need a trailing (9, 9) or (81,) shape, got {boards.shape}")
        return self.digits[flat[..., self.cells]].astype(boards.dtype).reshape(boards.shape)

    def inverse(self) -> Symmetry:
        return Symmetry(cells=np.argsort(self.cells), digits=np.argsort(self.digits))

    def then(self, other: Symmetry) -> Symmetry:
        """The symmetry that applies `self`, then `other`."""
        return Symmetry(cells=self.cells[other.cells], digits=other.digits[self.digits])


def identity() -> Symmetry:
    return Symmetry(cells=np.arange(81), digits=np.arange(10))


def _line_order(rng: np.random.Generator, groups: bool, within: bool) -> np.ndarray:
    """A permutation of 0..8 that keeps the three triples together: which input line each output line reads."""
    group_order = rng.permutation(3) if groups else np.arange(3)
    return np.concatenate([3 * g + (rng.permutation(3) if within else np.arange(3)) for g in group_order])


def random_symmetry(rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> Symmetry:
    """A uniformly random element of the subgroup the named `kinds` generate (all of them: the whole group)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown symmetry kind(s) {unknown}; valid: {list(KINDS)}")
    digits = np.concatenate([[0], 1 + rng.permutation(9)]) if "digits" in kinds else np.arange(10)
    rows = _line_order(rng, "bands" in kinds, "rows" in kinds)
    cols = _line_order(rng, "stacks" in kinds, "columns" in kinds)
    cells = (rows[:, None] * 9 + cols[None, :]).reshape(81)
    if "transpose" in kinds and rng.random() < 0.5:
        cells = cells.reshape(9, 9).T.reshape(81)
    return Symmetry(cells=cells, digits=digits)


def augment(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator,
            kinds: tuple[str, ...] = KINDS) -> tuple[np.ndarray, np.ndarray]:
    """The puzzle and its solution under one random symmetry (the same for both, so they stay consistent)."""
    symmetry = random_symmetry(rng, kinds)
    return symmetry.apply(puzzle), symmetry.apply(solution)
