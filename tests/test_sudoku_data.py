"""Tests for diffusion_gemma.tasks.sudoku.puzzles: solver, generator, grading, validation, parsing, splits."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from diffusion_gemma.tasks.sudoku import puzzles as S

# The public sets kept beside the checkout (as in CI); a user gets them with experiments/sudoku/download_sets.py.
BENCH_DIR = Path(os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks",
                                               "sudoku")))
needs_bench = pytest.mark.skipif(
    not BENCH_DIR.is_dir(), reason=f"no local copy of the public Sudoku sets at {BENCH_DIR}"
)


# ---------------------------------------------------------------------------------------------- helpers


def _is_valid_full(grid) -> bool:
    g = np.asarray(grid).reshape(9, 9)
    want = set(range(1, 10))
    rows = all(set(g[r]) == want for r in range(9))
    cols = all(set(g[:, c]) == want for c in range(9))
    boxes = all(set(g[r : r + 3, c : c + 3].reshape(-1)) == want for r in (0, 3, 6) for c in (0, 3, 6))
    return rows and cols and boxes


def _givens_agree(puzzle, solution) -> bool:
    p, s = np.asarray(puzzle), np.asarray(solution)
    return bool(np.all((p == 0) | (p == s)))


def _random_symmetry(grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply a random element of the Sudoku symmetry group (relabel, line/band perms, transpose)."""
    g = np.asarray(grid).copy()
    relabel = np.concatenate([[0], rng.permutation(9) + 1])
    g = relabel[g]
    rows = np.concatenate([band * 3 + rng.permutation(3) for band in rng.permutation(3)])
    cols = np.concatenate([stack * 3 + rng.permutation(3) for stack in rng.permutation(3)])
    g = g[rows][:, cols]
    if rng.random() < 0.5:
        g = g.T
    return g.astype(np.int8)


def _find_rectangle(grid: np.ndarray):
    """Index of 4 cells (r1|r2 in one band, c1|c2 in two stacks) holding a,b / b,a, or None."""
    for r1, r2 in itertools.combinations(range(9), 2):
        if r1 // 3 != r2 // 3:
            continue
        for c1, c2 in itertools.combinations(range(9), 2):
            if c1 // 3 != c2 // 3 and grid[r1, c1] == grid[r2, c2] and grid[r1, c2] == grid[r2, c1]:
                return np.array([r1, r1, r2, r2]), np.array([c1, c2, c1, c2])
    return None


@pytest.fixture(scope="module")
def solution() -> np.ndarray:
    return S.random_solution(np.random.default_rng(1234))


@pytest.fixture(scope="module")
def puzzle_and_solution() -> tuple[np.ndarray, np.ndarray]:
    return S.generate_puzzle(np.random.default_rng(99), 30)


# ---------------------------------------------------------------------------------------------- solver


def _load_pairs(name: str, limit: int | None = None):
    puzzles = S.load_puzzles(BENCH_DIR / f"{name}.txt")
    solutions = S.load_puzzles(BENCH_DIR / f"{name}_solutions.txt")
    assert len(puzzles) == len(solutions) > 0
    return puzzles[:limit], solutions[:limit]


@needs_bench
@pytest.mark.parametrize("name,limit", [("norvig_top95", 20), ("norvig_hardest11", None)])
def test_solver_matches_public_solutions(name, limit):
    puzzles, solutions = _load_pairs(name, limit)
    for puzzle, expected in zip(puzzles, solutions):
        got = S.solve(puzzle)
        assert got is not None and got.shape == (9, 9) and got.dtype == np.int8
        np.testing.assert_array_equal(got, expected)
        assert S.count_solutions(puzzle) == 1


@needs_bench
def test_public_files_parse_consistently():
    # Every parsed puzzle keeps its givens in the line-aligned solution, which is a valid grid.
    puzzles, solutions = _load_pairs("norvig_hardest11")
    raw = [ln.strip() for ln in (BENCH_DIR / "norvig_hardest11.txt").read_text().splitlines() if ln.strip()]
    assert len(raw) == len(puzzles)
    for text, puzzle, sol in zip(raw, puzzles, solutions):
        assert S.format_grid(puzzle, "compact") == text
        assert S.num_givens(puzzle) == sum(ch != "." for ch in text)
        assert _givens_agree(puzzle, sol) and _is_valid_full(sol)


def test_solver_on_generated_puzzles():
    rng = np.random.default_rng(7)
    for n in (22, 28, 40):
        puzzle, expected = S.generate_puzzle(rng, n)
        got = S.solve(puzzle)
        np.testing.assert_array_equal(got, expected)
        assert _is_valid_full(got) and _givens_agree(puzzle, got)


def test_solver_accepts_flat_and_nested_inputs(puzzle_and_solution):
    puzzle, expected = puzzle_and_solution
    np.testing.assert_array_equal(S.solve(puzzle.reshape(-1).tolist()), expected)
    np.testing.assert_array_equal(S.solve(puzzle.tolist()), expected)
    with pytest.raises(ValueError, match="81 cells"):
        S.solve(np.zeros(80, int))
    with pytest.raises(ValueError, match="0..9"):
        S.solve(np.full(81, 10))


def test_count_solutions_limits_and_contradictions(solution, puzzle_and_solution):
    empty = np.zeros((9, 9), np.int8)
    assert S.count_solutions(empty, limit=5) == 5
    assert _is_valid_full(S.solve(empty))
    assert S.count_solutions(solution) == 1
    np.testing.assert_array_equal(S.solve(solution), solution)

    # Blank a "deadly rectangle" (digits a/b on two rows of a band, in two stacks): two completions.
    rng = np.random.default_rng(0)
    for _ in range(50):
        grid = S.random_solution(rng)
        rect = _find_rectangle(grid)
        if rect is not None:
            break
    assert rect is not None, "no grid with a swappable rectangle in 50 random grids"
    g = grid.copy()
    g[rect] = 0
    assert S.count_solutions(g, limit=10) == 2
    assert S.count_solutions(g, limit=1) == 1
    assert _givens_agree(g, S.solve(g))

    # Clashing givens: no solution.
    clash = np.zeros((9, 9), np.int8)
    clash[0, 0] = clash[0, 8] = 5
    assert S.solve(clash) is None and S.count_solutions(clash) == 0
    # Consistent givens but unsolvable: 1..8 in row 0, and a 9 in the column of the last free cell.
    dead = np.zeros((9, 9), np.int8)
    dead[0, :8] = np.arange(1, 9)
    dead[5, 8] = 9
    assert S.solve(dead) is None and S.count_solutions(dead) == 0

    # Reduce a unique puzzle to a minimal one with count_solutions; then every given is needed.
    puzzle = puzzle_and_solution[0].copy()
    for r, c in np.argwhere(puzzle):
        v, puzzle[r, c] = puzzle[r, c], 0
        if S.count_solutions(puzzle) != 1:
            puzzle[r, c] = v
    assert S.count_solutions(puzzle) == 1
    for r, c in np.argwhere(puzzle):
        p = puzzle.copy()
        p[r, c] = 0
        assert S.count_solutions(p) == 2
    with pytest.raises(ValueError):
        S.count_solutions(puzzle, limit=0)


# ---------------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize(
    "n_givens,samples,seed",
    [(S.MIN_GIVENS, 1, 1), (21, 1, 2), (25, 3, 3), (35, 5, 4), (45, 5, 5), (60, 5, 6)],
)
def test_generator_unique_with_exact_givens(n_givens, samples, seed):
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        puzzle, sol = S.generate_puzzle(rng, n_givens)
        assert puzzle.shape == sol.shape == (9, 9) and puzzle.dtype == sol.dtype == np.int8
        assert S.num_givens(puzzle) == n_givens
        assert _is_valid_full(sol) and _givens_agree(puzzle, sol)
        assert S.count_solutions(puzzle, limit=3) == 1
        np.testing.assert_array_equal(S.solve(puzzle), sol)


def test_generator_rejects_targets_below_floor_and_gives_up_within_budget():
    rng = np.random.default_rng(0)
    for n in (17, S.MIN_GIVENS - 1, 82, 0):
        with pytest.raises(ValueError, match="outside the generator's range"):
            S.generate_puzzle(rng, n)
    tiny = S.GeneratorConfig(max_grids=1, restarts_per_grid=1, swap_steps=0)
    with pytest.raises(ValueError, match="no unique puzzle with 20 givens found in 1 grids"):
        S.generate_puzzle(np.random.default_rng(0), 20, tiny)
    with pytest.raises(ValueError):
        S.GeneratorConfig(max_grids=0)


def test_carve_puzzle_keeps_given_solution(solution):
    puzzle = S.carve_puzzle(solution, 32, np.random.default_rng(3))
    assert puzzle is not None and S.num_givens(puzzle) == 32
    assert _givens_agree(puzzle, solution) and S.count_solutions(puzzle) == 1
    np.testing.assert_array_equal(S.carve_puzzle(solution, 81, np.random.default_rng(3)), solution)
    with pytest.raises(ValueError, match="complete, valid"):
        S.carve_puzzle(puzzle, 30, np.random.default_rng(3))


def test_generation_is_deterministic_by_seed():
    a = S.generate_puzzle(np.random.default_rng(42), 30)
    b = S.generate_puzzle(np.random.default_rng(42), 30)
    c = S.generate_puzzle(np.random.default_rng(43), 30)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    np.testing.assert_array_equal(
        S.random_solution(np.random.default_rng(5)), S.random_solution(np.random.default_rng(5))
    )


def test_stream_is_deterministic_and_respects_givens_range():
    def take(seed, split, n=8):
        return list(itertools.islice(S.puzzle_stream(seed, 28, 36, split), n))

    first, again, other = take(11, "train"), take(11, "train"), take(12, "train")
    for (p1, s1), (p2, s2) in zip(first, again):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(s1, s2)
    assert any(not np.array_equal(s1, s2) for (_, s1), (_, s2) in zip(first, other))
    for puzzle, sol in first:
        assert 28 <= S.num_givens(puzzle) <= 36
        assert S.count_solutions(puzzle) == 1 and _givens_agree(puzzle, sol)
    assert len({S.num_givens(p) for p, _ in first}) > 1
    ev1, ev2 = take(11, "eval", 3), take(11, "eval", 3)
    for (p1, _), (p2, _) in zip(ev1, ev2):
        np.testing.assert_array_equal(p1, p2)


def test_stream_argument_errors_raise_at_call_time():
    with pytest.raises(ValueError, match="split"):
        S.puzzle_stream(0, 30, 40, "test")
    with pytest.raises(ValueError, match="min_givens"):
        S.puzzle_stream(0, 40, 30)
    with pytest.raises(ValueError, match="outside the generator's range"):
        S.puzzle_stream(0, 17, 30)
    with pytest.raises(ValueError, match="seed"):
        S.puzzle_stream(-1, 30, 40)
    with pytest.raises(ValueError):
        S.SplitRule(eval_fraction=1.0)


# ---------------------------------------------------------------------------------------------- splits


def test_isomorphism_key_is_invariant_under_sudoku_symmetries(solution):
    rng = np.random.default_rng(0)
    key = S.isomorphism_key(solution)
    split = S.solution_split(solution)
    for _ in range(20):
        twin = _random_symmetry(solution, rng)
        assert _is_valid_full(twin)
        assert S.isomorphism_key(twin) == key
        assert S.solution_split(twin) == split
    others = {S.isomorphism_key(S.random_solution(rng)) for _ in range(50)}
    assert len(others) == 50 and key not in others
    with pytest.raises(ValueError):
        S.isomorphism_key(np.zeros((9, 9), np.int8))


def test_train_and_eval_streams_are_disjoint():
    n = 200
    train = list(itertools.islice(S.puzzle_stream(0, 55, 60, "train"), n))
    evals = list(itertools.islice(S.puzzle_stream(0, 55, 60, "eval"), n))
    assert all(S.solution_split(s) == "train" for _, s in train)
    assert all(S.solution_split(s) == "eval" for _, s in evals)
    train_keys = {S.isomorphism_key(s) for _, s in train}
    eval_keys = {S.isomorphism_key(s) for _, s in evals}
    assert len(train_keys) == len(eval_keys) == n  # no repeats within a split either
    assert not train_keys & eval_keys
    train_grids = {s.tobytes() for _, s in train}
    assert not train_grids & {s.tobytes() for _, s in evals}
    # The same seed gives unrelated streams for the two splits.
    assert not np.array_equal(train[0][1], evals[0][1])


def test_split_fraction_follows_rule():
    rng = np.random.default_rng(8)
    grids = [S.random_solution(rng) for _ in range(300)]
    frac = np.mean([S.solution_split(g) == "eval" for g in grids])
    assert 0.04 < frac < 0.18  # default eval_fraction = 0.1
    half = S.SplitRule(eval_fraction=0.5)
    frac_half = np.mean([S.solution_split(g, half) == "eval" for g in grids])
    assert 0.38 < frac_half < 0.62
    salted = S.SplitRule(salt="another salt")
    assert [S.solution_split(g, salted) for g in grids] != [S.solution_split(g) for g in grids]


# ---------------------------------------------------------------------------------------------- grading


def test_givens_bucket_boundaries(solution):
    rng = np.random.default_rng(0)
    expected = {81: "easy", 40: "easy", 39: "medium", 30: "medium", 29: "hard", 17: "hard", 0: "hard"}
    for n, bucket in expected.items():
        assert S.givens_bucket(n) == bucket
        grid = solution.reshape(-1).copy()
        grid[rng.permutation(81)[: 81 - n]] = 0
        assert S.givens_bucket(grid.reshape(9, 9)) == bucket
    with pytest.raises(ValueError):
        S.givens_bucket(82)


def test_grade_levels_are_consistent(solution):
    one_blank = solution.copy()
    one_blank[4, 4] = 0
    g = S.grade(one_blank)
    assert (g.level, g.backtracks, g.nodes, g.givens) == ("easy", 0, 1, 80)

    # 'easy' means singles alone solve it, which is exactly when the search solver needs no branch.
    rng = np.random.default_rng(21)
    levels = []
    for n in (24, 30, 45):
        for _ in range(4):
            puzzle, _ = S.generate_puzzle(rng, n)
            gr = S.grade(puzzle)
            levels.append(gr.level)
            assert gr.givens == n and gr.backtracks >= 0
            assert (gr.level == "easy") == (gr.nodes == 1)
            if gr.level == "easy":
                assert gr.backtracks == 0
    assert "easy" in levels and set(levels) <= {"easy", "medium", "hard"}

    with pytest.raises(ValueError, match="without a solution"):
        bad = np.zeros((9, 9), np.int8)
        bad[0, 0] = bad[1, 1] = 3
        S.grade(bad)


@needs_bench
def test_grade_on_public_sets():
    # README of the benchmark: royle_plus is all singles-solvable; norvig_top95 always needs more.
    easy, _ = _load_pairs("royle_plus_35to50_400", 30)
    assert all(S.grade(p).level == "easy" for p in easy)
    hard, _ = _load_pairs("norvig_top95", 10)
    grades = [S.grade(p) for p in hard]
    assert all(g.level in ("medium", "hard") and g.nodes > 1 for g in grades)
    assert any(g.level == "hard" and g.backtracks > 0 for g in grades)


# ---------------------------------------------------------------------------------------------- validator


def test_validate_correct_and_incomplete(puzzle_and_solution):
    puzzle, sol = puzzle_and_solution
    ok = S.validate(puzzle, sol, sol)
    assert ok.is_solved and ok.units_valid and ok.complete and ok.givens_preserved
    assert ok.num_violations == 0 and ok.num_changed_givens == 0
    assert ok.cell_accuracy == 1.0 and ok.blank_accuracy == 1.0

    as_is = S.validate(puzzle, puzzle, sol)
    assert not as_is.complete and not as_is.is_solved and as_is.units_valid and as_is.givens_preserved
    assert as_is.cell_accuracy == pytest.approx(S.num_givens(puzzle) / 81)
    assert as_is.blank_accuracy == 0.0
    no_ref = S.validate(puzzle, sol)
    assert no_ref.is_solved and no_ref.cell_accuracy is None and no_ref.blank_accuracy is None


def test_validate_catches_row_column_and_box_violations(solution):
    puzzle = np.zeros((9, 9), np.int8)  # no givens: only the unit checks matter

    rows_bad = solution.copy()  # swap two cells of one column inside a box: only rows break
    rows_bad[[0, 1], 0] = rows_bad[[1, 0], 0]
    r = S.validate(puzzle, rows_bad, solution)
    assert (r.rows_valid, r.columns_valid, r.boxes_valid) == (False, True, True)
    assert r.num_violations == 2 and not r.is_solved and r.complete
    assert r.cell_accuracy == pytest.approx(79 / 81)

    cols_bad = solution.copy()  # swap two cells of one row inside a box: only columns break
    cols_bad[0, [0, 1]] = cols_bad[0, [1, 0]]
    r = S.validate(puzzle, cols_bad)
    assert (r.rows_valid, r.columns_valid, r.boxes_valid) == (True, False, True)
    assert r.num_violations == 2 and not r.is_solved

    boxes_bad = solution[:, [0, 1, 3, 2, 4, 5, 6, 7, 8]]  # swap columns across stacks: only boxes
    r = S.validate(puzzle, boxes_bad)
    assert (r.rows_valid, r.columns_valid, r.boxes_valid) == (True, True, False)
    assert r.num_violations > 0 and not r.is_solved

    clash = solution.copy()  # one wrong digit clashes in its row, column and box
    clash[0, 0] = solution[0, 1]
    r = S.validate(puzzle, clash, solution)
    assert not (r.rows_valid or r.columns_valid or r.boxes_valid)
    assert r.num_violations == 3


def test_validate_catches_changed_givens(puzzle_and_solution):
    puzzle, sol = puzzle_and_solution
    relabel = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9], np.int8)  # swap digits 1 and 2 everywhere
    other = relabel[sol]
    changed = int(np.sum(np.isin(puzzle, [1, 2])))
    r = S.validate(puzzle, other, sol)
    assert r.units_valid and r.complete and r.num_violations == 0
    assert not r.givens_preserved and not r.is_solved and r.num_changed_givens == changed > 0

    blanked = sol.copy()
    r0, c0 = np.argwhere(puzzle)[0]
    blanked[r0, c0] = 0
    r = S.validate(puzzle, blanked, sol)
    assert not r.givens_preserved and r.num_changed_givens == 1 and not r.complete
    assert r.blank_accuracy == 1.0


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_and_format_round_trips(puzzle_and_solution):
    puzzle, _ = puzzle_and_solution
    for style in ("spaces", "compact", "lines"):
        text = S.format_grid(puzzle, style)
        back = S.parse_grid(text)
        assert back.dtype == np.int8 and back.shape == (9, 9)
        np.testing.assert_array_equal(back, puzzle)
    compact = S.format_grid(puzzle, "compact")
    assert len(compact) == 81 and compact.count(".") == 81 - S.num_givens(puzzle)
    np.testing.assert_array_equal(S.parse_grid(compact.replace(".", "0")), puzzle)
    spaces = S.format_grid(puzzle, "spaces")
    assert spaces.split() == [str(v) for v in puzzle.reshape(-1)]
    lines = S.format_grid(puzzle, "lines").splitlines()
    assert len(lines) == 9 and all(len(ln) == 9 for ln in lines)
    spaced_lines = "\n".join(" ".join(ln) for ln in lines) + "\n"
    np.testing.assert_array_equal(S.parse_grid(spaced_lines), puzzle)
    np.testing.assert_array_equal(S.parse_grid("  " + compact + "\n"), puzzle)
    with pytest.raises(ValueError, match="unknown style"):
        S.format_grid(puzzle, "grid")


def test_parse_errors_name_the_problem(puzzle_and_solution):
    compact = S.format_grid(puzzle_and_solution[0], "compact")
    with pytest.raises(ValueError, match="expected 81 cells, got 80"):
        S.parse_grid(compact[:80])
    with pytest.raises(ValueError, match="expected 81 cells, got 82"):
        S.parse_grid(compact + "1")
    with pytest.raises(ValueError, match=r"bad character 'x' at cell 12 \(row 2, column 3\)"):
        S.parse_grid(compact[:11] + "x" + compact[12:])
    spaces = S.format_grid(puzzle_and_solution[0], "spaces").split()
    with pytest.raises(ValueError, match="expected 81 cells, got 80"):
        S.parse_grid(" ".join(spaces[:80]))
    with pytest.raises(ValueError, match="bad token '12'"):
        S.parse_grid(" ".join(["12"] + spaces[1:]))
    lines = S.format_grid(puzzle_and_solution[0], "lines").splitlines()
    with pytest.raises(ValueError, match="got 8 lines"):
        S.parse_grid("\n".join(lines[:8]))
    with pytest.raises(ValueError, match="grid line 4: expected 9 cells, got 10"):
        S.parse_grid("\n".join(lines[:3] + [lines[3] + "1"] + lines[4:]))
    with pytest.raises(ValueError, match="empty"):
        S.parse_grid("   \n")


def test_load_puzzles_skips_comments_and_reports_file_and_line(tmp_path, puzzle_and_solution):
    puzzle, sol = puzzle_and_solution
    good = tmp_path / "good.txt"
    good.write_text(
        "# a comment\n\n"
        + S.format_grid(puzzle, "compact")
        + "\n"
        + S.format_grid(sol, "spaces")
        + "\n\n"
    )
    grids = S.load_puzzles(good)
    assert grids.shape == (2, 9, 9) and grids.dtype == np.int8
    np.testing.assert_array_equal(grids[0], puzzle)
    np.testing.assert_array_equal(grids[1], sol)

    bad = tmp_path / "bad.txt"
    lines = ["# header", S.format_grid(puzzle, "compact"), "", S.format_grid(sol, "compact")[:-1] + "?"]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        S.load_puzzles(bad)
    msg = str(err.value)
    assert f"{os.fspath(bad)}:4" in msg and "bad character '?'" in msg

    short = tmp_path / "short.txt"
    short.write_text(S.format_grid(puzzle, "compact")[:70] + "\n")
    with pytest.raises(ValueError, match=r"short\.txt:1: expected 81 cells, got 70"):
        S.load_puzzles(short)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert S.load_puzzles(empty).shape == (0, 9, 9)


# ---------------------------------------------------------------------------------------------- training source


def _todays_puzzle(seed: int, index: int, min_givens: int, max_givens: int):
    """The training source's rule before the pool, augmentation and curriculum options existed."""
    rng = np.random.default_rng([seed, index])
    givens = int(rng.integers(min_givens, max_givens + 1))
    while True:
        puzzle, solution = S.generate_puzzle(rng, givens)
        if S.solution_split(solution) == "train":
            return puzzle, solution


def _sudoku_data(**options):
    from diffusion_gemma.data.pipeline import DataConfig

    return DataConfig(source="sudoku", seq_length=163, block_size=81, global_batch_size=4, shuffle_seed=3,
                      num_synthetic_examples=100, options={"min_givens": 35, "max_givens": 60, **options})


def test_source_with_the_new_options_off_generates_todays_examples():
    from diffusion_gemma.data.pipeline import make_source

    default = make_source(_sudoku_data())
    off = make_source(_sudoku_data(pool_per_givens=0, pool_workers=2, augment=False, curriculum=()))
    assert default.base_pool is None and not default.augmented and not default.curriculum
    for index in (0, 1, 7, 99):
        want_puzzle, want_solution = _todays_puzzle(3, index, 35, 60)
        for source in (default, off):
            puzzle, solution = source.puzzle(index)
            np.testing.assert_array_equal(puzzle, want_puzzle)
            np.testing.assert_array_equal(solution, want_solution)
        np.testing.assert_array_equal(default[index].tokens, off[index].tokens)


def test_curriculum_stage_follows_the_example_index():
    from diffusion_gemma.tasks.sudoku.source import SudokuSource

    stages = ((0, 50, 55), (0.3, 40, 45), (0.7, 30, 32))
    source = SudokuSource(num_examples=100, seed=0, min_givens=35, max_givens=60, seq_length=163, block_size=81,
                          curriculum=[list(stage) for stage in stages])  # lists, as a config file gives them
    assert source.stream_ordered and not SudokuSource(num_examples=100, seed=0, min_givens=35, max_givens=60,
                                                      seq_length=163, block_size=81).stream_ordered
    expected = {0: (50, 55), 29: (50, 55), 30: (40, 45), 69: (40, 45), 70: (30, 32), 99: (30, 32), 250: (30, 32)}
    assert {index: source.givens_range(index) for index in expected} == expected
    for index in (0, 29, 30, 55, 70, 99, 250):
        low, high = expected.get(index, (40, 45))
        puzzle, solution = source.puzzle(index)
        assert low <= S.num_givens(puzzle) <= high
        assert S.solution_split(solution) == "train" and S.count_solutions(puzzle) == 1


def test_source_options_errors_name_the_key():
    from diffusion_gemma.registry import RegistryError
    from diffusion_gemma.tasks.sudoku.source import SudokuDataOptions

    options = SudokuDataOptions(curriculum=[[0, 45, 60], [0.5, 22, 60]], pool_per_givens=2)
    assert options.curriculum == ((0.0, 45, 60), (0.5, 22, 60)) and options.givens_range == (22, 60)
    assert SudokuDataOptions(min_givens=33, max_givens=44).givens_range == (33, 44)
    bad = [
        (dict(curriculum=[(0.1, 40, 50)]), r"curriculum\[0\] starts at 0.1"),
        (dict(curriculum=[(0, 40, 50), (0.5, 30, 50), (0.5, 20, 50)]), r"curriculum\[2\] starts at 0.5"),
        (dict(curriculum=[(0, 40, 50), (1.0, 30, 50)]), r"curriculum\[1\] starts at 1.0"),
        (dict(curriculum=[(0, 19, 50)]), r"curriculum\[0\] = \(0, 19, 50\): need 20 <= min_givens"),
        (dict(curriculum=[(0, 50, 40)]), r"curriculum\[0\] = \(0, 50, 40\)"),
        (dict(curriculum=[(0, 40)]), r"curriculum\[0\] = \(0, 40\): expected \(start, min_givens, max_givens\)"),
        (dict(curriculum=[(0, 40.5, 50)]), r"givens must be integers"),
        (dict(pool_per_givens=-1), "pool_per_givens and pool_workers must be >= 0"),
        (dict(pool_workers=-2), "pool_per_givens and pool_workers must be >= 0"),
        (dict(pool_per_givens=5, min_givens=18), r"a pool needs givens >= 20 \(the generator's floor\), got 18"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            SudokuDataOptions(**options)
    with pytest.raises(RegistryError, match=r"data.options: curriculum\[0\] starts at 0.2"):
        _sudoku_data(curriculum=[(0.2, 40, 50)])
    with pytest.raises(RegistryError, match=r"data.options.pool_size"):
        _sudoku_data(pool_size=3)
