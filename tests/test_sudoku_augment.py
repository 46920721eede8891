"""Tests for diffusion_gemma.tasks.sudoku.augment: every symmetry keeps boards valid and puzzles unique, moves a
puzzle and its solution together, is invertible, and leaves the train/eval split unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffusion_gemma.tasks.sudoku import augment as A
from diffusion_gemma.tasks.sudoku import puzzles as S

KIND_SETS = [(kind,) for kind in A.KINDS] + [A.KINDS]
# Size of the group each kind generates alone: 9! relabellings, 3! band orders, 3!^3 row orders inside the bands, ...
GROUP_SIZES = {"digits": 362_880, "bands": 6, "stacks": 6, "rows": 216, "columns": 216, "transpose": 2}


def _is_valid_full(grid) -> bool:
    g = np.asarray(grid).reshape(9, 9)
    want = list(range(1, 10))
    units = [g[r] for r in range(9)] + [g[:, c] for c in range(9)]
    units += [g[r:r + 3, c:c + 3].reshape(-1) for r in (0, 3, 6) for c in (0, 3, 6)]
    return all(sorted(unit.tolist()) == want for unit in units)


@pytest.fixture(scope="module")
def puzzle_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [S.generate_puzzle(rng, givens) for givens in (24, 32, 45)]


@pytest.fixture(scope="module")
def solutions() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [S.random_solution(rng) for _ in range(25)]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda kinds: "+".join(kinds) if len(kinds) < 6 else "all")
def test_each_symmetry_keeps_puzzles_valid_unique_and_consistent(puzzle_pairs, kinds):
    rng = np.random.default_rng(len(kinds) * 100 + A.KINDS.index(kinds[0]))
    for puzzle, solution in puzzle_pairs:
        for _ in range(3):
            new_puzzle, new_solution = A.augment(puzzle, solution, rng, kinds)
            assert new_puzzle.shape == new_solution.shape == (9, 9)
            assert new_puzzle.dtype == new_solution.dtype == np.int8
            assert _is_valid_full(new_solution)
            assert np.all((new_puzzle == 0) | (new_puzzle == new_solution))  # givens agree with the solution
            assert S.num_givens(new_puzzle) == S.num_givens(puzzle)
            assert S.count_solutions(new_puzzle, limit=3) == 1
            np.testing.assert_array_equal(S.solve(new_puzzle), new_solution)
            # The same symmetry moved both boards: the blanks follow the cells, the digits follow the relabelling.
            assert sorted(np.bincount(new_puzzle.reshape(-1), minlength=10)[1:]) == \
                sorted(np.bincount(puzzle.reshape(-1), minlength=10)[1:])


@pytest.mark.parametrize("kind", A.KINDS)
def test_each_kind_draws_exactly_its_own_group(kind):
    """Many draws of one kind reach every element of its group and nothing outside it (the digit group is too
    large to exhaust: its draws only never move a cell and are nearly all distinct)."""
    rng = np.random.default_rng(A.KINDS.index(kind))
    draws = [A.random_symmetry(rng, (kind,)) for _ in range(3000)]
    cells = {d.cells.tobytes() for d in draws}
    digits = {d.digits.tobytes() for d in draws}
    if kind == "digits":
        assert cells == {np.arange(81).tobytes()} and len(digits) > 2950
        assert all(d.digits[0] == 0 and sorted(d.digits[1:]) == list(range(1, 10)) for d in draws)
        return
    assert digits == {np.arange(10).tobytes()}
    assert len(cells) == GROUP_SIZES[kind]
    grid = np.arange(81).reshape(9, 9)
    for d in draws[:200]:
        moved = d.cells.reshape(9, 9)
        if kind == "transpose":
            assert np.array_equal(moved, grid) or np.array_equal(moved, grid.T)
            continue
        lines = moved[:, 0] // 9 if kind in ("bands", "rows") else moved[0] % 9
        other = moved[0] % 9 if kind in ("bands", "rows") else moved[:, 0] // 9
        np.testing.assert_array_equal(other, np.arange(9))  # the other axis stays put
        if kind in ("bands", "stacks"):  # whole triples move, in order
            assert all(list(lines[3 * g:3 * g + 3]) == list(range(lines[3 * g], lines[3 * g] + 3)) for g in range(3))
        else:  # lines move only inside their triple
            np.testing.assert_array_equal(lines // 3, np.arange(9) // 3)


def test_inverse_composition_identity_and_batching(solutions):
    rng = np.random.default_rng(3)
    boards = np.stack(solutions[:4])
    first, second = A.random_symmetry(rng), A.random_symmetry(rng)
    for board in boards:
        np.testing.assert_array_equal(first.inverse().apply(first.apply(board)), board)
        np.testing.assert_array_equal(first.apply(first.inverse().apply(board)), board)
        np.testing.assert_array_equal(first.then(second).apply(board), second.apply(first.apply(board)))
        np.testing.assert_array_equal(A.identity().apply(board), board)
    np.testing.assert_array_equal(first.apply(boards), np.stack([first.apply(b) for b in boards]))
    flat = boards.reshape(4, 81)
    np.testing.assert_array_equal(first.apply(flat), first.apply(boards).reshape(4, 81))
    with pytest.raises(ValueError, match=r"trailing \(9, 9\) or \(81,\) shape, got \(4, 80\)"):
        first.apply(flat[:, :80])
    with pytest.raises(ValueError, match=r"unknown symmetry kind\(s\) \['mirror'\]"):
        A.random_symmetry(rng, ("digits", "mirror"))


def test_seeds_are_deterministic_and_distinct(solutions):
    puzzle = S.carve_puzzle(solutions[0], 40, np.random.default_rng(0))
    boards = [A.augment(puzzle, solutions[0], np.random.default_rng(seed)) for seed in range(300)]
    again = A.augment(puzzle, solutions[0], np.random.default_rng(7))
    np.testing.assert_array_equal(again[0], boards[7][0])
    np.testing.assert_array_equal(again[1], boards[7][1])
    assert len({p.tobytes() for p, _ in boards}) == 300
    assert len({s.tobytes() for _, s in boards}) == 300


# ---------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda kinds: "+".join(kinds) if len(kinds) < 6 else "all")
def test_split_key_is_invariant_under_every_symmetry(solutions, kinds):
    """`solution_split` is a function of `isomorphism_key`; the key being unchanged by every symmetry is what
    keeps an augmented TRAIN board off the EVAL side."""
    rng = np.random.default_rng(17 + len(kinds))
    for solution in solutions:
        key = S.isomorphism_key(solution)
        for _ in range(2):
            twin = A.random_symmetry(rng, kinds).apply(solution)
            assert S.isomorphism_key(twin) == key


def test_no_augmented_train_board_is_equivalent_to_an_eval_board():
    """If an augmented TRAIN board were equivalent to an EVAL board they would share the key, hence the split;
    checked on both sides: augmented TRAIN boards stay 'train', augmented EVAL boards stay 'eval', and no
    augmented TRAIN board shares a key with any EVAL board."""
    train = list(itertools.islice(S.puzzle_stream(3, 40, 50, "train"), 12))
    evals = list(itertools.islice(S.puzzle_stream(3, 40, 50, "eval"), 6))
    eval_keys = {S.isomorphism_key(solution) for _, solution in evals}
    rng = np.random.default_rng(23)
    for _, solution in train:
        for _ in range(10):
            _, twin = A.augment(np.zeros_like(solution), solution, rng)
            assert S.solution_split(twin) == "train"
            assert S.isomorphism_key(twin) not in eval_keys
    for _, solution in evals:
        for _ in range(10):
            twin = A.random_symmetry(rng).apply(solution)
            assert S.solution_split(twin) == "eval"
            assert S.isomorphism_key(twin) in eval_keys
