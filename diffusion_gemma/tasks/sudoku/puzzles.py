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
  a bounded number of grids (:class:`GeneratorConfig`). Practical floor: :data:`MIN_GIVENS` (= 20).
  Generation slows steeply as the target nears the floor (a 20-given puzzle can take many seconds).
  19 was not reached in 4000 local-search moves per grid, and 17-19-given puzzles are far too rare
  among random grids for removal-based generation, so targets below the floor raise ``ValueError``
  at once instead of searching for hours (the public 17-clue lists serve evaluation there).
* :func:`grade` -- 'easy' (naked/hidden singles suffice), 'medium' (also needs locked candidates and
  naked/hidden pairs/triples), 'hard' (needs search beyond that) plus the search solver's backtracks.
* :func:`givens_bucket` -- the experiment's strata by number of givens (easy >= 40, medium 30-39, hard < 30).
* :func:`validate` -- row/column/box validity, givens preserved, solved, violation count, cell accuracy.
* :func:`parse_grid`, :func:`read_grids`, :func:`load_puzzles`, :func:`format_grid` -- the common text
  formats (files: one grid per line, or 9 lines per grid).
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
    "EASY_MIN_GIVENS",
    "MEDIUM_MIN_GIVENS",
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
    "read_grids",
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
      swap_steps: local-search moves per grid (swap one given for another cell of the solution, then
        remove greedily), used only when plain removal stops above the target. About 1000 moves
        reach 20 givens on most grids; 21+ rarely needs more than 200.
      swap_tries: replacement cells tried per move.
    """

    max_grids: int = 20
    restarts_per_grid: int = 2
    swap_steps: int = 1000
    swap_tries: int = 4

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < (0 if field.name == "swap_steps" else 1):
                raise ValueError(f"GeneratorConfig.{field.name} is too small: {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Which solution grids belong to the eval split (see :func:`solution_split`).

    Train and eval streams are disjoint only when they use the same rule, so keep the default.
    """

    eval_fraction: float = 0.1
    salt: str = "diffusion_gemma/sudoku/split/v1"

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


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
        if v and not _place(g, rows, cols, boxes, i, 1 << (v - 1)):
            return None
    return g, rows, cols, boxes


def _place(g, rows, cols, boxes, i: int, bit: int) -> bool:
    """Write digit `bit` into cell i and its row/col/box masks; False (nothing written) when a peer has it."""
    r, c, b = _ROW[i], _COL[i], _BOX[i]
    if (rows[r] | cols[c] | boxes[b]) & bit:
        return False
    g[i] = bit
    rows[r] |= bit
    cols[c] |= bit
    boxes[b] |= bit
    return True


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
                if not _place(g, rows, cols, boxes, i, bit):
                    return None
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
        if not _swap_move(cells, sol, rng, config.swap_tries):
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


# --------------------------------------------------------------------------------------------------
# Difficulty
# --------------------------------------------------------------------------------------------------

EASY_MIN_GIVENS = 40
MEDIUM_MIN_GIVENS = 30

Bucket = Literal["easy", "medium", "hard"]


def givens_bucket(puzzle) -> Bucket:
    """The experiment's strata by number of givens: easy >= 40, medium 30-39, hard < 30.

    Accepts a grid or an already counted number of givens.
    """
    n = puzzle if isinstance(puzzle, (int, np.integer)) else num_givens(puzzle)
    if not 0 <= n <= 81:
        raise ValueError(f"number of givens must be in 0..81, got {n}")
    if n >= EASY_MIN_GIVENS:
        return "easy"
    if n >= MEDIUM_MIN_GIVENS:
        return "medium"
    return "hard"


@dataclasses.dataclass(frozen=True)
class Grade:
    """Difficulty of one puzzle.

    Attributes:
      level: 'easy' = naked/hidden singles alone solve it; 'medium' = also needs locked candidates
        (pointing/claiming) or naked/hidden pairs/triples; 'hard' = needs more (search).
      backtracks: dead ends of the MRV search solver (singles propagation) before the first solution.
      nodes: search nodes visited by that solver (1 = solved by propagation alone).
      givens: number of givens.
    """

    level: Bucket
    backtracks: int
    nodes: int
    givens: int


def _eliminate(cand: list[int], i: int, bit: int) -> bool:
    """Remove ``bit`` from the peers of solved cell ``i``; False when a peer runs out of candidates."""
    for p in _PEERS[i]:
        m = cand[p]
        if m & bit:
            m &= ~bit
            if not m:
                return False
            cand[p] = m
    return True


def _singles_step(cand: list[int], solved: list[bool]) -> bool | None:
    """One round of naked then hidden singles; returns progress, or None on a contradiction."""
    progress = False
    for i in range(81):
        m = cand[i]
        if not solved[i] and m & (m - 1) == 0:
            if not m or not _eliminate(cand, i, m):
                return None
            solved[i] = True
            progress = True
    if progress:
        return True
    for unit in _UNITS:
        for bit in _BITS_OF[_FULL]:
            spots = [i for i in unit if cand[i] & bit]
            if not spots:
                return None
            if len(spots) == 1 and cand[spots[0]] != bit:
                cand[spots[0]] = bit
                progress = True
    return progress


def _advanced_step(cand: list[int]) -> bool:
    """One round of locked candidates and naked/hidden pairs and triples; returns progress."""
    progress = False
    # Locked candidates: a digit confined to one line within a box (or to one box within a line).
    for unit in _UNITS:
        for bit in _BITS_OF[_FULL]:
            spots = [i for i in unit if cand[i] & bit and cand[i] != bit]
            if len(spots) < 2:
                continue
            for key, units in ((_ROW, _ROW_UNITS), (_COL, _COL_UNITS), (_BOX, _BOX_UNITS)):
                if all(key[i] == key[spots[0]] for i in spots):
                    for p in units[key[spots[0]]]:
                        if p not in unit and cand[p] & bit:
                            cand[p] &= ~bit
                            progress = True
    # Naked and hidden subsets of size 2 and 3.
    for unit in _UNITS:
        open_cells = [i for i in unit if cand[i] & (cand[i] - 1)]
        for k in (2, 3):
            if len(open_cells) <= k:
                continue
            for combo in itertools.combinations(open_cells, k):
                union = 0
                for i in combo:
                    union |= cand[i]
                if _POPCOUNT[union] == k:
                    for p in open_cells:
                        if p not in combo and cand[p] & union:
                            cand[p] &= ~union
                            progress = True
            open_digits = [b for b in _BITS_OF[_FULL] if sum(1 for i in open_cells if cand[i] & b) >= 2]
            for combo in itertools.combinations(open_digits, k):
                digits = sum(combo)
                spots = [i for i in open_cells if cand[i] & digits]
                if len(spots) == k:
                    for p in spots:
                        if cand[p] & ~digits:
                            cand[p] &= digits
                            progress = True
    return progress


def _logical_solve(cells: list[int], advanced: bool) -> bool:
    """Whether human-style techniques alone solve the puzzle (singles, plus more if ``advanced``)."""
    cand = [(1 << (v - 1)) if v else _FULL for v in cells]
    solved = [False] * 81
    while True:
        step = _singles_step(cand, solved)
        if step is None:
            return False
        if step:
            continue
        if all(solved):
            return True
        if not (advanced and _advanced_step(cand)):
            return False
        if any(m == 0 for m in cand):
            return False


def grade(puzzle) -> Grade:
    """Difficulty of a solvable puzzle (see :class:`Grade`); ValueError when it has no solution."""
    cells = _cells(puzzle)
    stats = _run_search(cells, limit=1)
    if stats.first is None:
        raise ValueError("cannot grade a puzzle without a solution")
    if _logical_solve(cells, advanced=False):
        level: Bucket = "easy"
    elif _logical_solve(cells, advanced=True):
        level = "medium"
    else:
        level = "hard"
    givens = sum(1 for v in cells if v)
    return Grade(level=level, backtracks=stats.backtracks, nodes=stats.nodes, givens=givens)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    """How a candidate answer compares with its puzzle (and reference solution, when known).

    Attributes:
      rows_valid / columns_valid / boxes_valid: no digit repeats in any row / column / box (blanks
        are ignored, so an incomplete grid can be valid).
      givens_preserved: every given of the puzzle is unchanged in the candidate.
      complete: no blank cells.
      is_solved: complete, all units valid and givens preserved -- a correct solution even when it
        differs from the reference (only possible for puzzles without a unique solution).
      num_violations: sum over the 27 units and 9 digits of (occurrences - 1) where a digit repeats;
        a single misplaced digit clashing in its row, column and box counts 3.
      num_changed_givens: givens the candidate changed (or blanked).
      cell_accuracy: fraction of the 81 cells equal to the reference solution (None without one).
      blank_accuracy: the same over the puzzle's blank cells only (None without a reference or when
        the puzzle has no blanks) -- the number that does not reward copying the givens.
    """

    rows_valid: bool
    columns_valid: bool
    boxes_valid: bool
    givens_preserved: bool
    complete: bool
    is_solved: bool
    num_violations: int
    num_changed_givens: int
    cell_accuracy: float | None = None
    blank_accuracy: float | None = None

    @property
    def units_valid(self) -> bool:
        return self.rows_valid and self.columns_valid and self.boxes_valid


def _unit_violations(cells: list[int], units) -> int:
    total = 0
    for unit in units:
        digits = [cells[i] for i in unit if cells[i]]
        total += len(digits) - len(set(digits))
    return total


def validate(puzzle, candidate, solution=None) -> ValidationResult:
    """Check a candidate answer against the Sudoku rules, the puzzle's givens and a reference."""
    p, c = _cells(puzzle), _cells(candidate)
    row_v = _unit_violations(c, _ROW_UNITS)
    col_v = _unit_violations(c, _COL_UNITS)
    box_v = _unit_violations(c, _BOX_UNITS)
    changed = sum(1 for a, b in zip(p, c) if a and a != b)
    complete = all(c)
    cell_acc = blank_acc = None
    if solution is not None:
        s = _cells(solution)
        cell_acc = sum(1 for a, b in zip(c, s) if a == b) / 81
        blanks = [i for i in range(81) if not p[i]]
        if blanks:
            blank_acc = sum(1 for i in blanks if c[i] == s[i]) / len(blanks)
    return ValidationResult(
        rows_valid=row_v == 0,
        columns_valid=col_v == 0,
        boxes_valid=box_v == 0,
        givens_preserved=changed == 0,
        complete=complete,
        is_solved=complete and row_v + col_v + box_v == 0 and changed == 0,
        num_violations=row_v + col_v + box_v,
        num_changed_givens=changed,
        cell_accuracy=cell_acc,
        blank_accuracy=blank_acc,
    )


# --------------------------------------------------------------------------------------------------
# Text formats
# --------------------------------------------------------------------------------------------------

_CELL_CHARS = frozenset("0123456789.")


def _parse_cells(chars: list[str], where: str) -> np.ndarray:
    if len(chars) != 81:
        raise ValueError(f"{where}expected 81 cells, got {len(chars)}")
    out = []
    for k, ch in enumerate(chars):
        if ch not in _CELL_CHARS:
            raise ValueError(
                f"{where}bad character {ch!r} at cell {k + 1} (row {k // 9 + 1}, column {k % 9 + 1}); "
                "expected a digit 1-9, or '0' or '.' for a blank"
            )
        out.append(0 if ch == "." else int(ch))
    return _to_array(out)


def _line_cells(line: str, where: str, line_no: int) -> list[str]:
    tokens = line.split()
    chars = list(tokens[0]) if len(tokens) == 1 else tokens
    if len(chars) != 9:
        raise ValueError(f"{where}grid line {line_no}: expected 9 cells, got {len(chars)}")
    return chars


def parse_grid(text: str, *, source: str | None = None) -> np.ndarray:
    """Parse one grid into a (9, 9) int8 array, 0 = blank.

    Accepted: 81 characters with '.' or '0' for blanks; 81 whitespace-separated digits (the Hackable
    Diffusion format); 9 lines of 9 digits, with or without spaces. Only syntax is checked, not the
    Sudoku rules. Errors name what is wrong, prefixed with ``source`` (e.g. ``"file.txt:12"``).
    """
    where = f"{source}: " if source else ""
    body = text.strip()
    if not body:
        raise ValueError(f"{where}empty input, expected 81 cells")
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if len(lines) > 1:
        if len(lines) != 9:
            raise ValueError(f"{where}expected 1 line of 81 cells or 9 lines of 9, got {len(lines)} lines")
        chars = [ch for n, ln in enumerate(lines, 1) for ch in _line_cells(ln, where, n)]
    else:
        tokens = body.split()
        chars = tokens if len(tokens) > 1 else list(body)
        for k, tok in enumerate(chars):
            if len(tok) != 1:
                raise ValueError(f"{where}bad token {tok!r} at cell {k + 1}; cells are single characters")
    return _parse_cells(chars, where)


def read_grids(path: str | os.PathLike) -> list[tuple[int, np.ndarray]]:
    """``(line number, grid)`` for every grid of a file, the line number being where the grid starts.

    A grid is one line of 81 cells (compact or space-separated), or 9 consecutive lines of 9 cells (with or
    without spaces). Blank lines and lines starting with '#' are skipped; errors name the file and line.
    """
    name = os.fspath(path)
    grids: list[tuple[int, np.ndarray]] = []
    rows: list[tuple[int, str]] = []  # the pending rows of a 9-line grid

    def flush_rows(at: int) -> None:
        if rows:
            raise ValueError(f"{name}:{rows[0][0]}: a grid of 9 lines starts here but has {len(rows)} line(s) "
                             f"before line {at}; expected 9 lines of 9 cells, or 81 cells on one line")

    with open(path, encoding="utf-8") as f:
        line_no = 0
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            tokens = text.split()
            if len(tokens if len(tokens) > 1 else tokens[0]) == 9:
                rows.append((line_no, text))
                if len(rows) == 9:
                    start = rows[0][0]
                    grids.append((start, parse_grid("\n".join(t for _, t in rows), source=f"{name}:{start}")))
                    rows.clear()
                continue
            flush_rows(line_no)
            grids.append((line_no, parse_grid(text, source=f"{name}:{line_no}")))
        flush_rows(line_no + 1)
    return grids


def load_puzzles(path: str | os.PathLike) -> np.ndarray:
    """Read every grid of a file (see :func:`read_grids`) into an (N, 9, 9) int8 array.

    Blank lines and lines starting with '#' are skipped; errors name the file and line number.
    """
    grids = [grid for _, grid in read_grids(path)]
    return np.stack(grids) if grids else np.zeros((0, 9, 9), np.int8)


FormatStyle = Literal["spaces", "compact", "lines"]


def format_grid(grid, style: FormatStyle = "spaces") -> str:
    """Grid as text: 'spaces' = 81 space-separated digits, 0 = blank (Hackable Diffusion);
    'compact' = 81 characters, '.' = blank; 'lines' = 9 lines of 9 digits, 0 = blank."""
    cells = _cells(grid)
    if style == "spaces":
        return " ".join(str(v) for v in cells)
    if style == "compact":
        return "".join(str(v) if v else "." for v in cells)
    if style == "lines":
        return "\n".join("".join(str(v) for v in cells[r * 9 : r * 9 + 9]) for r in range(9))
    raise ValueError(f"unknown style {style!r}; expected 'spaces', 'compact' or 'lines'")


# --------------------------------------------------------------------------------------------------
# Train / eval split and streams
# --------------------------------------------------------------------------------------------------

Split = Literal["train", "eval"]
_SPLIT_IDS = {"train": 0, "eval": 1}


def _cycle_type(src, dst) -> tuple[int, ...]:
    """Cycle lengths of the digit permutation src[k] -> dst[k], sorted."""
    perm = dict(zip(src, dst))
    seen, lengths = set(), []
    for start in perm:
        if start in seen:
            continue
        n, d = 0, start
        while d not in seen:
            seen.add(d)
            d = perm[d]
            n += 1
        lengths.append(n)
    return tuple(sorted(lengths))


def _line_pair_profile(lines) -> tuple:
    return tuple(
        sorted(
            (a // 3 == b // 3, _cycle_type(lines[a], lines[b]))
            for a in range(9)
            for b in range(a + 1, 9)
        )
    )


def isomorphism_key(solution) -> str:
    """A key shared by all grids equivalent to ``solution`` under the Sudoku symmetries.

    For every pair of rows, the digits in the same column define a permutation of 1..9; its cycle
    type, tagged with whether the rows share a band, is unchanged by relabelling digits and by
    permuting columns, and row permutations (within bands, or of bands) only reorder the pairs. The
    same for columns, and the two sorted profiles are themselves sorted so transposition changes
    nothing. Distinct isomorphism classes almost always get distinct keys.
    """
    cells = _cells(solution)
    if 0 in cells or _initial_state(cells) is None:
        raise ValueError("isomorphism_key needs a complete, valid solution grid")
    rows = [cells[r * 9 : r * 9 + 9] for r in range(9)]
    cols = [cells[c::9] for c in range(9)]
    profiles = sorted([_line_pair_profile(rows), _line_pair_profile(cols)])
    return repr(profiles)


def solution_split(solution, rule: SplitRule = DEFAULT_SPLIT_RULE) -> Split:
    """'eval' or 'train' for a solution grid: the split rule that keeps the two disjoint.

    Rule: ``u = sha256(rule.salt + isomorphism_key(solution))`` read as a number in [0, 1); the grid
    is 'eval' when ``u < rule.eval_fraction``, else 'train'. Streams only emit puzzles whose solution
    falls on their side, so no solution grid -- not even up to relabelling, row/column/band/stack
    permutations or transposition -- is shared between train and eval.
    """
    digest = hashlib.sha256((rule.salt + isomorphism_key(solution)).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if u < rule.eval_fraction else "train"


def puzzle_stream(
    seed: int,
    min_givens: int,
    max_givens: int,
    split: Split = "train",
    *,
    rule: SplitRule = DEFAULT_SPLIT_RULE,
    config: GeneratorConfig = DEFAULT_GENERATOR_CONFIG,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(puzzle, solution)`` pairs, identical for the same arguments.

    Each item draws its number of givens uniformly from ``[min_givens, max_givens]``, then random
    solution grids until one belongs to ``split`` (:func:`solution_split`), then carves a unique
    puzzle from it. Train and eval streams are disjoint by construction whatever their seeds, as long
    as they share ``rule``. Arguments are checked at call time, not at the first ``next``.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if min_givens > max_givens:
        raise ValueError(f"min_givens={min_givens} > max_givens={max_givens}")
    _check_givens(min_givens)
    _check_givens(max_givens)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split]])
    return _stream(rng, min_givens, max_givens, split, rule, config)


def _stream(rng, min_givens, max_givens, split, rule, config):
    while True:
        n_givens = int(rng.integers(min_givens, max_givens + 1))
        for _ in range(config.max_grids):
            solution = random_solution(rng)
            while solution_split(solution, rule) != split:
                solution = random_solution(rng)
            puzzle = carve_puzzle(solution, n_givens, rng, config)
            if puzzle is not None:
                break
        else:
            raise ValueError(f"no unique puzzle with {n_givens} givens found in {config.max_grids} grids")
        yield puzzle, solution
