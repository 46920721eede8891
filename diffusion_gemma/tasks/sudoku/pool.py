"""A pool of base puzzles built once, before training, in worker processes, and cached on disk.

Low-given puzzles are slow to generate (seconds each near the generator's floor), far too slow to make inside the
step loop; a fixed number per givens count, reused under random symmetries (`augment.py`), gives the same
coverage for a one-off cost. Only solutions on the TRAIN side of the split rule enter the pool.

Puzzle k of givens count g is a pure function of (seed, g, k), so the pool does not depend on the number of
workers. The cache file is named by a hash of everything that determines the pool (`PoolSpec`), written
atomically, and checked on load (spec, shapes, givens, solutions valid, checksum); a bad file is rebuilt with a
warning that names it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from absl import logging

from diffusion_gemma import atomic_write
from diffusion_gemma.tasks.sudoku import puzzles

_FORMAT = "diffusion_gemma.sudoku_pool/v1"
_SEED_TAG = 0x5EED_9001  # keeps the pool's random streams apart from the on-the-fly source's [seed, index]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolSpec:
    """Everything that determines a pool's contents (and so its cache file name).

    per_givens: base puzzles for every givens count in [min_givens, max_givens].
    """

    per_givens: int
    min_givens: int
    max_givens: int
    seed: int
    rule: puzzles.SplitRule = puzzles.DEFAULT_SPLIT_RULE
    generator: puzzles.GeneratorConfig = puzzles.DEFAULT_GENERATOR_CONFIG

    def __post_init__(self):
        if self.per_givens < 1:
            raise ValueError(f"a pool needs at least 1 puzzle per givens count, got {self.per_givens}")
        if not puzzles.MIN_GIVENS <= self.min_givens <= self.max_givens <= puzzles.MAX_GIVENS:
            raise ValueError(f"a pool's givens range must lie in [{puzzles.MIN_GIVENS}, {puzzles.MAX_GIVENS}] "
                             f"(the generator's range), got [{self.min_givens}, {self.max_givens}]")
        if self.seed < 0:
            raise ValueError(f"a pool's seed must be non-negative, got {self.seed}")

    @property
    def givens(self) -> range:
        return range(self.min_givens, self.max_givens + 1)

    def as_json(self) -> str:
        return json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    def file_name(self) -> str:
        digest = hashlib.sha256(self.as_json().encode()).hexdigest()[:16]
        return f"pool-g{self.min_givens}-{self.max_givens}-n{self.per_givens}-s{self.seed}-{digest}.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """puzzles, solutions: (len(spec.givens), per_givens, 9, 9) int8; row i holds givens count spec.min_givens + i."""

    spec: PoolSpec
    puzzles: np.ndarray
    solutions: np.ndarray

    def pick(self, givens: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        row = givens - self.spec.min_givens
        return self.puzzles[row, k], self.solutions[row, k]


class PoolCacheError(ValueError):
    """A cache file that cannot be used: unreadable, for other parameters, or with inconsistent contents."""


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusion_gemma", "sudoku_pool")


def base_puzzle(spec: PoolSpec, givens: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Puzzle k with `givens` givens: fresh grids until one is on the TRAIN side, then carve it (another grid
    when the carving budget runs out)."""
    rng = np.random.default_rng([_SEED_TAG, spec.seed, givens, k])
    for _ in range(spec.generator.max_grids):
        solution = puzzles.random_solution(rng)
        while puzzles.solution_split(solution, spec.rule) != "train":
            solution = puzzles.random_solution(rng)
        puzzle = puzzles.carve_puzzle(solution, givens, rng, spec.generator)
        if puzzle is not None:
            return puzzle, solution
    raise ValueError(f"no unique puzzle with {givens} givens found in {spec.generator.max_grids} grids")


def _timed_chunk(spec: PoolSpec, items: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Worker entry point (top level, so spawned processes can import it): base puzzles and seconds each."""
    out_puzzles, out_solutions, seconds = [], [], []
    for givens, k in items:
        start = time.perf_counter()
        puzzle, solution = base_puzzle(spec, givens, k)
        seconds.append(time.perf_counter() - start)
        out_puzzles.append(puzzle)
        out_solutions.append(solution)
    return np.stack(out_puzzles), np.stack(out_solutions), seconds


def _chunks(spec: PoolSpec, size: int) -> list[list[tuple[int, int]]]:
    """Work items, fewest givens (slowest) first so that the long jobs start early; `size` items per chunk."""
    items = [(givens, k) for givens in spec.givens for k in range(spec.per_givens)]
    return [items[i:i + size] for i in range(0, len(items), size)]


def generate(spec: PoolSpec, *, workers: int = 1) -> tuple[Pool, dict[int, float]]:
    """Build the pool with `workers` processes (1: in this process). Also returns the mean seconds per base
    puzzle for each givens count (one worker's rate)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Chunks of a few puzzles amortise the inter-process traffic; the slow low-given chunks stay small enough
    # to spread over the workers.
    chunks = _chunks(spec, size=max(1, min(8, spec.per_givens // (2 * workers) or 1)))
    if workers == 1:
        results = [_timed_chunk(spec, chunk) for chunk in chunks]
    else:
        # spawn: the caller may be a JAX process with threads running, which fork would copy half-locked.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as executor:
            results = list(executor.map(_timed_chunk, [spec] * len(chunks), chunks))
    shape = (len(spec.givens), spec.per_givens, 9, 9)
    pool = Pool(spec=spec, puzzles=np.concatenate([r[0] for r in results]).reshape(shape),
                solutions=np.concatenate([r[1] for r in results]).reshape(shape))
    seconds = np.concatenate([r[2] for r in results]).reshape(shape[:2])
    return pool, {givens: float(seconds[i].mean()) for i, givens in enumerate(spec.givens)}


def _checksum(puzzle_array: np.ndarray, solution_array: np.ndarray) -> str:
    return hashlib.sha256(puzzle_array.tobytes() + solution_array.tobytes()).hexdigest()


def _valid_solutions(solutions: np.ndarray) -> bool:
    """Every row, column and box of every (..., 9, 9) grid holds 1..9 exactly once."""
    boxes = solutions.reshape(*solutions.shape[:-2], 3, 3, 3, 3).swapaxes(-3, -2).reshape(solutions.shape)
    want = np.arange(1, 10)
    return all(np.array_equal(np.sort(units, axis=-1), np.broadcast_to(want, units.shape))
               for units in (solutions, solutions.swapaxes(-1, -2), boxes))


def check(pool: Pool) -> None:
    """Raise PoolCacheError when the arrays are not the spec's pool: shapes, givens counts, givens agreeing with
    valid solutions. (Uniqueness and the split side are the generator's guarantees, too slow to re-check.)"""
    spec = pool.spec
    shape = (len(spec.givens), spec.per_givens, 9, 9)
    for name, array in (("puzzles", pool.puzzles), ("solutions", pool.solutions)):
        if array.shape != shape or array.dtype != np.int8:
            raise PoolCacheError(f"{name} has shape {array.shape} and dtype {array.dtype}; expected {shape} int8")
    counts = (pool.puzzles != 0).sum(axis=(-1, -2))
    expected = np.asarray(spec.givens)[:, None]
    if not np.array_equal(counts, np.broadcast_to(expected, counts.shape)):
        raise PoolCacheError("puzzles do not have the givens counts of their rows")
    if not np.all((pool.puzzles == 0) | (pool.puzzles == pool.solutions)):
        raise PoolCacheError("some givens disagree with their solution")
    if not _valid_solutions(pool.solutions):
        raise PoolCacheError("some solutions break the Sudoku rules")


def save(pool: Pool, path: str) -> None:
    """Write atomically (a reader never sees half a file); replaces an existing file."""
    buffer = io.BytesIO()
    np.savez(buffer, spec=np.asarray(pool.spec.as_json()), puzzles=pool.puzzles, solutions=pool.solutions,
             checksum=np.asarray(_checksum(pool.puzzles, pool.solutions)))
    with atomic_write.atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())


def load(path: str, spec: PoolSpec) -> Pool:
    """The pool stored at `path`; PoolCacheError (saying what is wrong) when it is not a sound pool for `spec`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_spec, checksum = str(data["spec"]), str(data["checksum"])
            pool = Pool(spec=spec, puzzles=data["puzzles"], solutions=data["solutions"])
    except Exception as err:  # whatever a damaged file raises (zip, header, EOF, ...), the answer is: rebuild
        raise PoolCacheError(f"unreadable ({type(err).__name__}: {err})") from None
    if stored_spec != spec.as_json():
        raise PoolCacheError(f"built for other parameters: {stored_spec}")
    check(pool)
    if _checksum(pool.puzzles, pool.solutions) != checksum:
        raise PoolCacheError("checksum mismatch")
    return pool


def load_or_generate(spec: PoolSpec, *, cache_dir: str | None = None, workers: int = 1) -> Pool:
    """The cached pool for `spec` under `cache_dir` (default: `default_cache_dir()`), generated and cached when
    missing; a cache file that fails `load` is rebuilt and replaced, with a warning naming it and the reason."""
    directory = os.path.expanduser(cache_dir or default_cache_dir())
    os.makedirs(directory, exist_ok=True)  # an unusable cache directory fails now, not after the generation
    path = os.path.join(directory, spec.file_name())
    if os.path.exists(path):
        try:
            return load(path, spec)
        except PoolCacheError as err:
            logging.warning("Sudoku pool cache %s is not usable (%s); regenerating it", path, err)
    # The few-givens boards are slow to find (seconds each near the floor): say why the run is quiet, also when
    # the CLIs hold logging at WARNING.
    print(f"Sudoku pool: building {spec.per_givens * len(spec.givens)} base puzzles (givens {spec.min_givens}-"
          f"{spec.max_givens}) with {workers} worker(s), once; cached at {path}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    pool, _ = generate(spec, workers=workers)
    logging.info("Sudoku pool: %d base puzzles (givens %d-%d) in %.1f s with %d worker(s); cached at %s",
                 pool.puzzles.shape[0] * pool.puzzles.shape[1], spec.min_givens, spec.max_givens,
                 time.perf_counter() - start, workers, path)
    save(pool, path)
    return pool
