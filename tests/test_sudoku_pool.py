"""Tests for diffusion_gemma.tasks.sudoku.pool and its use by the training source: base puzzles built in worker
processes (the same pool whatever the number of workers), TRAIN side only, down to the generator's floor, cached
on disk by their parameters, and a damaged or foreign cache file rebuilt."""

from __future__ import annotations

import os

import numpy as np
import pytest

from diffusion_gemma.data.pipeline import DataConfig, make_source
from diffusion_gemma.tasks.sudoku import pool as P
from diffusion_gemma.tasks.sudoku import puzzles as S
from diffusion_gemma.tasks.sudoku import source as source_lib

LOW_SPEC = P.PoolSpec(per_givens=1, min_givens=S.MIN_GIVENS, max_givens=S.MIN_GIVENS + 1, seed=10)  # a quick seed
CHEAP_SPEC = P.PoolSpec(per_givens=3, min_givens=40, max_givens=43, seed=1)


@pytest.fixture(scope="module")
def low_pool() -> P.Pool:
    """The generator's floor, built by 2 spawned workers."""
    pool, seconds = P.generate(LOW_SPEC, workers=2)
    assert sorted(seconds) == [S.MIN_GIVENS, S.MIN_GIVENS + 1] and all(s > 0 for s in seconds.values())
    return pool


def test_pool_down_to_the_floor_is_sound_and_train_side_only(low_pool):
    assert low_pool.puzzles.shape == low_pool.solutions.shape == (2, 1, 9, 9)
    P.check(low_pool)
    for row, givens in enumerate(LOW_SPEC.givens):
        for k in range(LOW_SPEC.per_givens):
            puzzle, solution = low_pool.pick(givens, k)
            np.testing.assert_array_equal(puzzle, low_pool.puzzles[row, k])
            assert S.num_givens(puzzle) == givens
            assert S.count_solutions(puzzle) == 1
            np.testing.assert_array_equal(S.solve(puzzle), solution)
            assert S.solution_split(solution) == "train"
    assert len({s.tobytes() for s in low_pool.solutions.reshape(-1, 81)}) == 2


def test_pool_does_not_depend_on_the_number_of_workers(low_pool):
    one = P.generate(LOW_SPEC, workers=1)[0]
    np.testing.assert_array_equal(one.puzzles, low_pool.puzzles)
    np.testing.assert_array_equal(one.solutions, low_pool.solutions)
    other_seed = P.generate(P.PoolSpec(per_givens=3, min_givens=40, max_givens=43, seed=2))[0]
    assert not np.array_equal(other_seed.solutions, P.generate(CHEAP_SPEC)[0].solutions)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        P.generate(CHEAP_SPEC, workers=0)


def test_spec_errors():
    with pytest.raises(ValueError, match="at least 1 puzzle per givens count"):
        P.PoolSpec(per_givens=0, min_givens=30, max_givens=40, seed=0)
    with pytest.raises(ValueError, match=r"must lie in \[20, 81\].*got \[19, 40\]"):
        P.PoolSpec(per_givens=1, min_givens=19, max_givens=40, seed=0)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        P.PoolSpec(per_givens=1, min_givens=30, max_givens=40, seed=-1)


def _no_generation(*args, **kwargs):
    raise AssertionError("the pool was generated although a sound cache file exists")


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    pool = P.load_or_generate(CHEAP_SPEC, cache_dir=str(tmp_path), workers=1)
    path = tmp_path / CHEAP_SPEC.file_name()
    assert os.listdir(tmp_path) == [CHEAP_SPEC.file_name()]  # no temporary file left behind
    monkeypatch.setattr(P, "generate", _no_generation)
    again = P.load_or_generate(CHEAP_SPEC, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.puzzles, pool.puzzles)
    np.testing.assert_array_equal(again.solutions, pool.solutions)
    other = P.PoolSpec(per_givens=3, min_givens=40, max_givens=43, seed=2)
    assert other.file_name() != CHEAP_SPEC.file_name()
    assert P.PoolSpec(per_givens=3, min_givens=40, max_givens=43, seed=1).file_name() == path.name


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert P.default_cache_dir() == str(tmp_path / "xdg" / "diffusion_gemma" / "sudoku_pool")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert P.default_cache_dir() == str(tmp_path / "home" / ".cache" / "diffusion_gemma" / "sudoku_pool")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    P.load_or_generate(CHEAP_SPEC, workers=1)
    assert (tmp_path / "xdg" / "diffusion_gemma" / "sudoku_pool" / CHEAP_SPEC.file_name()).is_file()


def _tamper(pool: P.Pool, **arrays) -> P.Pool:
    return P.Pool(spec=pool.spec, **{"puzzles": pool.puzzles, "solutions": pool.solutions, **arrays})


def _damages(path, pool: P.Pool):
    """(what, how to damage the cache file, the reason expected in the warning)."""
    wrong_digit = pool.solutions.copy()
    wrong_digit[0, 0, 0, 0] = wrong_digit[0, 0, 0, 0] % 9 + 1
    blank = pool.puzzles.copy()
    blank[1, 2][blank[1, 2] != 0] = 0
    other_spec = P.PoolSpec(per_givens=3, min_givens=40, max_givens=43, seed=99)

    def truncate():
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    def rewrite(new_pool):
        return lambda: P.save(new_pool, str(path))

    def keep_checksum(new_pool):
        def write():
            np.savez(str(path), spec=np.asarray(pool.spec.as_json()), puzzles=new_pool.puzzles,
                     solutions=new_pool.solutions, checksum=np.asarray(P._checksum(pool.puzzles, pool.solutions)))
        return write

    return [
        ("truncated", truncate, "unreadable"),
        ("not a zip", lambda: path.write_text("hello"), "unreadable"),
        ("other spec", rewrite(P.Pool(spec=other_spec, puzzles=pool.puzzles, solutions=pool.solutions)),
         "built for other parameters"),
        ("wrong shape", rewrite(_tamper(pool, puzzles=pool.puzzles[:, :2], solutions=pool.solutions[:, :2])),
         r"puzzles has shape \(4, 2, 9, 9\)"),
        ("givens count", rewrite(_tamper(pool, puzzles=blank)), "givens counts"),
        ("invalid solution", rewrite(_tamper(pool, solutions=wrong_digit)), "givens disagree|break the Sudoku rules"),
        ("checksum", keep_checksum(_tamper(pool, puzzles=pool.puzzles[:, ::-1].copy(),
                                           solutions=pool.solutions[:, ::-1].copy())), "checksum mismatch"),
    ]


def test_damaged_or_foreign_cache_files_are_detected_and_rebuilt(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(P.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    pool = P.load_or_generate(CHEAP_SPEC, cache_dir=str(tmp_path), workers=1)
    path = tmp_path / CHEAP_SPEC.file_name()
    for what, damage, reason in _damages(path, pool):
        damage()
        with pytest.raises(P.PoolCacheError, match=reason):
            P.load(str(path), CHEAP_SPEC)
        warnings.clear()
        rebuilt = P.load_or_generate(CHEAP_SPEC, cache_dir=str(tmp_path), workers=1)
        assert len(warnings) == 1 and str(path) in warnings[0] and "regenerating" in warnings[0], what
        np.testing.assert_array_equal(rebuilt.puzzles, pool.puzzles)
        np.testing.assert_array_equal(P.load(str(path), CHEAP_SPEC).solutions, pool.solutions)


def test_unusable_cache_dir_fails_before_generating(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(P, "generate", _no_generation)
    with pytest.raises(OSError):
        P.load_or_generate(CHEAP_SPEC, cache_dir=str(blocker / "pool"))


# ---------------------------------------------------------------------------------------------- training source


def _data_config(tmp_path, **options) -> DataConfig:
    return DataConfig(source="sudoku", seq_length=163, block_size=81, global_batch_size=4, shuffle_seed=1,
                      num_synthetic_examples=40, options={"min_givens": 40, "max_givens": 43,
                                                          "pool_cache_dir": str(tmp_path), **options})


def test_source_draws_augmented_pool_puzzles(tmp_path):
    plain = make_source(_data_config(tmp_path, pool_per_givens=3, pool_workers=1))
    spec = plain.base_pool.spec
    assert (spec.per_givens, spec.min_givens, spec.max_givens, spec.seed) == (3, 40, 43, 1)
    base = {s.tobytes() for s in plain.base_pool.solutions.reshape(-1, 81)}
    augmented = make_source(_data_config(tmp_path, pool_per_givens=3, pool_workers=1, augment=True))
    for index in range(30):
        puzzle, solution = plain.puzzle(index)
        assert solution.tobytes() in base  # drawn from the pool, as is
        twin_puzzle, twin_solution = augmented.puzzle(index)
        assert twin_solution.tobytes() not in base  # the same draw under a symmetry
        assert S.num_givens(twin_puzzle) == S.num_givens(puzzle)
        assert S.isomorphism_key(twin_solution) == S.isomorphism_key(solution)
        assert S.solution_split(twin_solution) == "train"
        assert np.all((twin_puzzle == 0) | (twin_puzzle == twin_solution))
        np.testing.assert_array_equal(augmented.puzzle(index)[0], twin_puzzle)  # a pure function of the index
        example = augmented[index]
        np.testing.assert_array_equal(example.tokens, augmented[index].tokens)
    assert len({plain.puzzle(i)[1].tobytes() for i in range(30)}) > 6  # the pool's puzzles are all used


def test_source_pool_must_cover_its_givens(tmp_path):
    pool = P.generate(CHEAP_SPEC)[0]
    with pytest.raises(ValueError, match=r"givens \[39, 43\] are outside the pool's \[40, 43\]"):
        source_lib.SudokuSource(num_examples=8, seed=0, min_givens=39, max_givens=43, seq_length=163, block_size=81,
                                base_pool=pool)
    with pytest.raises(ValueError, match=r"givens \[41, 44\] are outside"):
        source_lib.SudokuSource(num_examples=8, seed=0, min_givens=40, max_givens=43, seq_length=163, block_size=81,
                                base_pool=pool, curriculum=((0, 41, 43), (0.5, 41, 44)))


def test_curriculum_stages_follow_the_training_steps(tmp_path):
    """A curriculum source is read in stream order: example i lands in step i // batch, so the first half of the
    run sees the first stage's givens and the second half the second's, not a mixture at every step."""
    from diffusion_gemma.data.pipeline import make_dataset

    steps, batch = 6, 4
    config = _data_config(tmp_path, pool_per_givens=2, pool_workers=1, curriculum=((0, 42, 43), (0.5, 40, 41)))
    config = DataConfig(**{**config.__dict__, "global_batch_size": batch, "num_synthetic_examples": steps * batch})
    source = make_source(config)
    blanks_by_step = []
    for batch_features in list(make_dataset(source, config, num_steps=steps))[:steps]:
        prompts = np.asarray(batch_features["input_ids"])[:, 1:82]
        blanks_by_step.append(sorted(set((prompts == 3).sum(axis=1).tolist())))  # digit 0 (a blank) is id 3
    givens_by_step = [[81 - b for b in blanks] for blanks in blanks_by_step]
    assert all(set(g) <= {42, 43} for g in givens_by_step[:steps // 2]), givens_by_step
    assert all(set(g) <= {40, 41} for g in givens_by_step[steps // 2:]), givens_by_step


def test_prefetch_workers_serve_the_same_stream_and_resume_where_it_was_saved(tmp_path):
    """`data.prefetch_workers`: batches built in worker processes are the in-process stream, batch for batch, and
    a saved position resumes there; a position saved by the in-process pipeline is refused in one line."""
    from diffusion_gemma.data.pipeline import IteratorStateError, iterator_state_json, make_dataset, \
        restore_iterator_state

    steps = 6
    plain_config = _data_config(tmp_path, pool_per_givens=2, pool_workers=1, augment=True)
    config = DataConfig(**{**plain_config.__dict__, "prefetch_workers": 2})
    source = make_source(config)
    plain = iter(make_dataset(source, plain_config, num_steps=steps))
    expected = [next(plain)["input_ids"] for _ in range(steps)]
    served = iter(make_dataset(source, config, num_steps=steps))
    try:
        first = [next(served)["input_ids"] for _ in range(3)]
        saved = iterator_state_json(served)
        rest = [next(served)["input_ids"] for _ in range(steps - 3)]
    finally:
        served.close()
    np.testing.assert_array_equal(np.stack(first + rest), np.stack(expected))
    resumed = iter(make_dataset(source, config, num_steps=steps))
    try:
        restore_iterator_state(resumed, saved)
        np.testing.assert_array_equal(np.stack([next(resumed)["input_ids"] for _ in range(steps - 3)]),
                                      np.stack(expected[3:]))
    finally:
        resumed.close()
    with pytest.raises(IteratorStateError, match="resume with the data settings it was saved with"):
        restore_iterator_state(iter(make_dataset(source, plain_config, num_steps=steps)), saved)
    with pytest.raises(ValueError, match="data.prefetch_workers must be >= 0"):
        DataConfig(**{**plain_config.__dict__, "prefetch_workers": -1})
