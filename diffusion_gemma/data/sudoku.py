"""Sudoku data for the DiffusionGemma Sudoku experiment: solve, generate, grade, validate, parse.

Pure Python + numpy (no jax), so it can run in data-loading workers and in tests on a laptop.

Grids are ``(9, 9)`` ``int8`` numpy arrays, row-major, ``0`` = blank, ``1..9`` = digits. Every public
function that takes a grid also accepts anything ``np.asarray`` turns into 81 integers (a flat list, a
``(9, 9)`` nested list, ...).

Overview:

* :func:`solve` / :func:`count_solutions` -- bitmask constraint propagation (naked + hidden singles)
  with minimum-remaining-values backtracking; classic hard sets (norvig_top95, magictour_top1465) take a
  few milliseconds per puzzle. Counting stops at ``limit`` so uniqueness checks are cheap.
* :func:`generate_puzzle` -- random full grid (seeded ``np.random.Generator``), then cells are removed in
  random order while the solution stays unique, until the requested number of givens is reached. When
  removal gets stuck at a minimal puzzle above the target, a short local search (swap one given for
  another, then remove again) digs lower; after that the grid is abandoned and a new one is tried, up to
  a bounded number of grids. Practical floor: :data:`MIN_GIVENS` (= 20) -- 20-21 givens take a second or
  so each, 17-19-given puzzles are far too rare among random grids for removal-based generation, so
  targets below the floor raise ``ValueError`` immediately instead of searching for hours.
* :func:`grade` -- 'easy' (naked/hidden singles suffice), 'medium' (also needs locked candidates and
  naked/hidden pairs/triples), 'hard' (needs search beyond that) plus the search solver's backtracks.
* :func:`givens_bucket` -- the experiment's strata by number of givens (easy >= 40, medium 30-39, hard < 30).
* :func:`validate` -- row/column/box validity, givens preserved, solved, violation count, cell accuracy.
* :func:`parse_grid`, :func:`load_puzzles`, :func:`format_grid` -- the common text formats.
* :func:`puzzle_stream` -- deterministic infinite ``(puzzle, solution)`` streams; train and eval are
  disjoint by construction (see :func:`solution_split`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np

__all__ = [
    "MIN_GIVENS",
    "MAX_GIVENS",
    "GeneratorConfig",
    "SplitRule",
    "DEFAULT_GENERATOR_CONFIG",
    "DEFAULT_SPLIT_RULE",
    "Grade",
    "ValidationResult",
    "solve",
    "count_solutions",
    "random_solution",
    "carve_puzzle",
    "generate_puzzle",
    "grade",
    "givens_bucket",
    "num_givens",
    "validate",
    "parse_grid",
    "load_puzzles",
    "format_grid",
    "isomorphism_key",
    "solution_split",
    "puzzle_stream",
]

# --------------------------------------------------------------------------------------------------
# Board geometry (cells are indexed 0..80 row-major; digits are stored as bits 1 << (d - 1)).
# --------------------------------------------------------------------------------------------------

_FULL = 0x1FF  # all nine digit bits
_ROW = tuple(i // 9 for i in range(81))
_COL = tuple(i % 9 for i in range(81))
_BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
_ROW_UNITS = tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
_COL_UNITS = tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
_BOX_UNITS = tuple(
    tuple((br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3))
    for br in range(3)
    for bc in range(3)
)
_UNITS = _ROW_UNITS + _COL_UNITS + _BOX_UNITS
_PEERS = tuple(
    tuple(sorted(set(_ROW_UNITS[_ROW[i]] + _COL_UNITS[_COL[i]] + _BOX_UNITS[_BOX[i]]) - {i}))
    for i in range(81)
)
_POPCOUNT = tuple(bin(m).count("1") for m in range(512))
_BIT_TO_DIGIT = {1 << k: k + 1 for k in range(9)}
_BITS_OF = tuple(tuple(1 << k for k in range(9) if m >> k & 1) for m in range(512))

MIN_GIVENS = 20
"""Practical floor of :func:`generate_puzzle` (see the module docstring)."""
MAX_GIVENS = 81


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Search budget of the generator; bounded so generation always terminates.

    Attributes:
      max_grids: fresh solution grids tried before :func:`generate_puzzle` gives up (``ValueError``).
      restarts_per_grid: random removal orders tried on one grid before the local search.
      swap_steps: local-search moves (swap one given for another, then remove greedily) per grid,
        used only when plain removal stops above the target.
    """

    max_grids: int = 200
    restarts_per_grid: int = 2
    swap_steps: int = 300


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Which solution grids belong to the eval split (see :func:`solution_split`).

    Train and eval streams are disjoint only when they use the same rule, so keep the default.
    """

    eval_fraction: float = 0.1
    salt: str = "diffusion_gemma/sudoku/split/v1"


DEFAULT_GENERATOR_CONFIG = GeneratorConfig()
DEFAULT_SPLIT_RULE = SplitRule()


# --------------------------------------------------------------------------------------------------
# Grid conversion
# --------------------------------------------------------------------------------------------------


def _cells(grid) -> list[int]:
    """Flat list of 81 Python ints in 0..9; raises ValueError otherwise."""
    arr = np.asarray(grid)
    if arr.size != 81:
        raise ValueError(f"a Sudoku grid needs 81 cells, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"a Sudoku grid needs integer cells, got dtype {arr.dtype}")
    flat = arr.reshape(81).astype(np.int64)
    if flat.min() < 0 or flat.max() > 9:
        raise ValueError("Sudoku cells must be in 0..9 (0 = blank)")
    return flat.tolist()


def _to_array(cells: list[int]) -> np.ndarray:
    return np.asarray(cells, dtype=np.int8).reshape(9, 9)


def num_givens(puzzle) -> int:
    """Number of filled cells."""
    return sum(1 for v in _cells(puzzle) if v)


# --------------------------------------------------------------------------------------------------
# Solver: bitmask propagation (naked + hidden singles) + MRV backtracking
# --------------------------------------------------------------------------------------------------


class _SearchStats:
    """Mutable search counters; ``limit`` stops the search once that many solutions are found."""

    __slots__ = ("limit", "count", "first", "nodes", "backtracks", "rng")

    def __init__(self, limit: int, rng: np.random.Generator | None = None):
        self.limit = limit
        self.count = 0
        self.first: list[int] | None = None
        self.nodes = 0
        self.backtracks = 0
        self.rng = rng


def _initial_state(cells: list[int]):
    """Bit grid and used-digit masks per row/col/box, or None when the givens clash."""
    g = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(cells):
        if v:
            bit = 1 << (v - 1)
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            g[i] = bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return g, rows, cols, boxes


def _propagate(g, rows, cols, boxes, empties):
    """Fill naked and hidden singles to a fixpoint (in place).

    Returns ``(cand, empties)``: candidate masks (0 for filled cells) and the cells still empty, or
    None on a contradiction. Hidden singles found in one sweep are placed with a re-check against the
    current masks: candidates only shrink, so a digit whose only spot was since blocked (or taken by
    another digit) is a contradiction.
    """
    ROW, COL, BOX, FULL = _ROW, _COL, _BOX, _FULL
    cand = [0] * 81
    while True:
        placed = False
        left = []
        for i in empties:
            if g[i]:
                cand[i] = 0  # filled by a hidden single in the last sweep
                continue
            r, c, b = ROW[i], COL[i], BOX[i]
            m = FULL & ~(rows[r] | cols[c] | boxes[b])
            if not m:
                return None
            if m & (m - 1) == 0:
                g[i] = m
                rows[r] |= m
                cols[c] |= m
                boxes[b] |= m
                cand[i] = 0
                placed = True
            else:
                cand[i] = m
                left.append(i)
        empties = left
        if placed:
            continue
        if not empties:
            return cand, empties
        for unit in _UNITS:
            once = twice = done = 0
            for i in unit:
                m = cand[i]
                if m:
                    twice |= once & m
                    once |= m
                else:
                    done |= g[i]
            hidden = once & ~twice
            if (once | done) != FULL:
                return None
            if not hidden:
                continue
            for i in unit:
                bit = cand[i] & hidden
                if not bit:
                    continue
                if bit & (bit - 1):
                    return None  # one cell is the only spot for two digits
                if g[i]:
                    if g[i] != bit:
                        return None
                    continue
                r, c, b = ROW[i], COL[i], BOX[i]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return None
                g[i] = bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                placed = True
        if not placed:
            return cand, empties


def _search(g, rows, cols, boxes, empties, stats: _SearchStats) -> None:
    """Depth-first search; records solutions in ``stats`` until ``stats.limit`` is reached."""
    stats.nodes += 1
    result = _propagate(g, rows, cols, boxes, empties)
    if result is None:
        stats.backtracks += 1
        return
    cand, empties = result
    if not empties:
        stats.count += 1
        if stats.first is None:
            stats.first = g[:]
        return
    best, best_n = -1, 10
    for i in empties:
        n = _POPCOUNT[cand[i]]
        if n < best_n:
            best, best_n = i, n
            if n == 2:
                break
    bits = list(_BITS_OF[cand[best]])
    if stats.rng is not None:
        stats.rng.shuffle(bits)
    r, c, b = _ROW[best], _COL[best], _BOX[best]
    for bit in bits:
        g2, rows2, cols2, boxes2 = g[:], rows[:], cols[:], boxes[:]
        g2[best] = bit
        rows2[r] |= bit
        cols2[c] |= bit
        boxes2[b] |= bit
        _search(g2, rows2, cols2, boxes2, empties, stats)
        if stats.count >= stats.limit:
            return


def _run_search(cells: list[int], limit: int, rng: np.random.Generator | None = None) -> _SearchStats:
    stats = _SearchStats(limit, rng)
    state = _initial_state(cells)
    if state is not None:
        g = state[0]
        _search(*state, [i for i in range(81) if not g[i]], stats)
    return stats


def _bits_to_digits(g: list[int]) -> list[int]:
    return [_BIT_TO_DIGIT[b] for b in g]


def solve(grid) -> np.ndarray | None:
    """A solution of ``grid`` as a (9, 9) int8 array, or None when it has none (incl. clashing givens).

    With several solutions the first one found is returned; use :func:`count_solutions` to check
    uniqueness.
    """
    stats = _run_search(_cells(grid), limit=1)
    return None if stats.first is None else _to_array(_bits_to_digits(stats.first))


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions, counted up to ``limit`` (``limit=2`` answers "is it unique?" cheaply)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return _run_search(_cells(grid), limit=limit).count


def _has_solution(cells: list[int]) -> bool:
    return _run_search(cells, limit=1).count > 0


def _unique_without(cells: list[int], i: int, value: int) -> bool:
    """Whether blanking cell ``i`` (whose solution digit is ``value``) keeps the solution unique.

    ``cells`` must have a unique solution with ``value`` at ``i``; the blanked puzzle stays unique iff
    no other digit at ``i`` leads to a solution, which is cheaper to test than counting to 2.
    """
    cells[i] = 0
    try:
        used = set()
        for p in _PEERS[i]:
            if cells[p]:
                used.add(cells[p])
        for d in range(1, 10):
            if d == value or d in used:
                continue
            cells[i] = d
            if _has_solution(cells):
                return False
        return True
    finally:
        cells[i] = value


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def random_solution(rng: np.random.Generator) -> np.ndarray:
    """A random complete valid grid: the search on an empty board with shuffled digit order."""
    stats = _run_search([0] * 81, limit=1, rng=rng)
    assert stats.first is not None
    return _to_array(_bits_to_digits(stats.first))


def _remove_greedily(cells: list[int], order, target: int) -> int:
    """Blank cells of ``order`` one by one while the solution stays unique; returns the givens left."""
    n = sum(1 for v in cells if v)
    for i in order:
        if n <= target:
            break
        v = cells[i]
        if v and _unique_without(cells, i, v):
            cells[i] = 0
            n -= 1
    return n


def _swap_move(
    cells: list[int], solution: list[int], rng: np.random.Generator, max_tries: int = 81
) -> bool:
    """Replace one random given by another cell of the solution, keeping uniqueness (in place).

    ``cells`` is a minimal puzzle, so blanking a given ``i`` admits other solutions, all of which
    differ at ``i``. One is found by forcing another digit at ``i``; a new given is then taken where
    it disagrees with ``solution``, which rules it out. Returns whether the result is unique again.
    """
    givens = [k for k in range(81) if cells[k]]
    i = givens[int(rng.integers(len(givens)))]
    cells[i] = 0
    other = None
    for d in rng.permutation(np.arange(1, 10)).tolist():
        if d == solution[i]:
            continue
        cells[i] = d
        stats = _run_search(cells, limit=1)
        cells[i] = 0
        if stats.first is not None:
            other = _bits_to_digits(stats.first)
            break
    if other is not None:
        diff = [k for k in range(81) if not cells[k] and k != i and other[k] != solution[k]]
        for j in rng.permutation(diff).tolist()[:max_tries]:
            cells[j] = solution[j]
            if _run_search(cells, limit=2).count == 1:
                return True
            cells[j] = 0
    cells[i] = solution[i]
    return False


def carve_puzzle(
    solution,
    n_givens: int,
    rng: np.random.Generator,
    config: GeneratorConfig = DEFAULT_GENERATOR_CONFIG,
) -> np.ndarray | None:
    """A puzzle with exactly ``n_givens`` givens whose unique solution is ``solution``, or None.

    Removal in random order first (a few orders); if every order stops at a minimal puzzle above the
    target, a local search of swap moves followed by greedy removal tries to dig lower. None means the
    budget for this grid ran out: try another grid.
    """
    sol = _cells(solution)
    if 0 in sol or _initial_state(sol) is None:
        raise ValueError("carve_puzzle needs a complete, valid solution grid")
    _check_givens(n_givens)
    best: list[int] | None = None
    best_n = 82
    for _ in range(max(1, config.restarts_per_grid)):
        cells = sol[:]
        n = _remove_greedily(cells, rng.permutation(81).tolist(), n_givens)
        if n == n_givens:
            return _to_array(cells)
        if n < best_n:
            best, best_n = cells, n
    assert best is not None
    cells, n = best, best_n
    for _ in range(config.swap_steps):
        if not _swap_move(cells, sol, rng):
            continue
        n = _remove_greedily(cells, rng.permutation(81).tolist(), n_givens)
        if n == n_givens:
            return _to_array(cells)
    return None


def _check_givens(n_givens: int) -> None:
    if not MIN_GIVENS <= n_givens <= MAX_GIVENS:
        raise ValueError(
            f"n_givens={n_givens} is outside the generator's range [{MIN_GIVENS}, {MAX_GIVENS}]: "
            f"unique puzzles with fewer than {MIN_GIVENS} givens are too rare for removal-based "
            "generation within a bounded search (use an external 17-clue list for evaluation)"
        )


def generate_puzzle(
    rng: np.random.Generator,
    n_givens: int,
    config: GeneratorConfig = DEFAULT_GENERATOR_CONFIG,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(puzzle, solution)`` pair with a unique solution and exactly ``n_givens`` givens.

    Raises ValueError when ``n_givens`` is outside ``[MIN_GIVENS, 81]`` or ``config.max_grids`` grids
    did not yield such a puzzle.
    """
    _check_givens(n_givens)
    for _ in range(config.max_grids):
        solution = random_solution(rng)
        puzzle = carve_puzzle(solution, n_givens, rng, config)
        if puzzle is not None:
            return puzzle, solution
    raise ValueError(f"no unique puzzle with {n_givens} givens found in {config.max_grids} grids")
