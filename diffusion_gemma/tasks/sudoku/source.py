"""The Sudoku training source: puzzles from the TRAIN side of the split rule, generated on the fly or drawn from a
pool built before training (`pool.py`), optionally under a random symmetry (`augment.py`) and a givens
curriculum, rendered in a prompt format (`formats.py`) and packed as SFT examples.

Its settings are `data.options` (`SudokuDataOptions`); the generic `data` fields it reads are seq_length,
block_size, shuffle_seed (the generator's and the pool's seed) and num_synthetic_examples (how many puzzles make
an epoch; the unit of the curriculum's stage starts).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from diffusion_gemma.data.chat import SftExample, pack_example
from diffusion_gemma.tasks.sudoku import augment, clamp, pool, puzzles
from diffusion_gemma.tasks.sudoku.formats import FORMATS, CompactFormat, SudokuFormat, make_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class SudokuDataOptions:
    """`data.options` of the `sudoku` source: givens drawn uniformly in [min_givens, max_givens] per puzzle;
    `format` compact (a 16-id vocabulary, from-scratch models) or chat (the released model's prompt).

    The rest is off by default (every example generated on the fly, exactly as without these fields):
      pool_per_givens: base puzzles built before training for every givens count the run uses (0: no pool);
        example i then draws one of them instead of generating a puzzle. Built with `pool_workers` processes
        (0: one per CPU core) and cached under `pool_cache_dir` ("": $XDG_CACHE_HOME or ~/.cache, then
        diffusion_gemma/sudoku_pool), keyed by the pool's parameters and data.shuffle_seed.
      augment: every example under its own random Sudoku symmetry (digits, bands, stacks, rows in a band,
        columns in a stack, transposition); the split by solution isomorphism class is unchanged by them.
      curriculum: stages ((start, min_givens, max_givens), ...) replacing min_givens/max_givens; the first starts
        at 0 and `start` is a fraction of data.num_synthetic_examples: example i uses the last stage with
        start <= i / num_synthetic_examples. The source then asks the pipeline to read it in stream order
        (`SudokuSource.stream_ordered`), where example i is in training step i // data.global_batch_size: with
        num_synthetic_examples = num_steps * global_batch_size a stage's start is the fraction of the run where
        it begins. (Read shuffled over the source index, the stages would be mixed at every step.)
    """

    min_givens: int = 30
    max_givens: int = 50
    format: str = "compact"
    pool_per_givens: int = 0
    pool_workers: int = 0
    pool_cache_dir: str = ""
    augment: bool = False
    curriculum: tuple[tuple[float, int, int], ...] = ()
    clamp_givens: bool = False  # givens' answer cells clean and unscored in training (compact format only)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format = {self.format!r}; expected one of {FORMATS}")
        if self.clamp_givens:
            clamp.check_format(self.format)
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= min_givens <= max_givens <= 81, got {self.min_givens}, "
                             f"{self.max_givens}")
        if self.pool_per_givens < 0 or self.pool_workers < 0:
            raise ValueError(f"pool_per_givens and pool_workers must be >= 0, got {self.pool_per_givens}, "
                             f"{self.pool_workers}")
        object.__setattr__(self, "curriculum", _checked_curriculum(self.curriculum))
        low, high = self.givens_range
        if self.pool_per_givens and low < puzzles.MIN_GIVENS:
            raise ValueError(f"a pool needs givens >= {puzzles.MIN_GIVENS} (the generator's floor), got {low}")

    @property
    def givens_range(self) -> tuple[int, int]:
        """The fewest and most givens any example uses (the pool covers every count in between)."""
        if not self.curriculum:
            return self.min_givens, self.max_givens
        return min(stage[1] for stage in self.curriculum), max(stage[2] for stage in self.curriculum)


def _checked_curriculum(stages) -> tuple[tuple[float, int, int], ...]:
    """Stages as tuples (config files give lists); ValueError naming the stage that is wrong."""
    checked = []
    for k, stage in enumerate(stages):
        stage = tuple(stage)
        if len(stage) != 3:
            raise ValueError(f"curriculum[{k}] = {stage}: expected (start, min_givens, max_givens)")
        start, low, high = stage
        if not all(isinstance(givens, (int, np.integer)) for givens in (low, high)):
            raise ValueError(f"curriculum[{k}] = {stage}: givens must be integers")
        if not 0 <= start < 1 or (k == 0 and start != 0) or (k and start <= checked[-1][0]):
            raise ValueError(f"curriculum[{k}] starts at {start}: stages start at 0, then at increasing "
                             "fractions below 1 of data.num_synthetic_examples")
        if not puzzles.MIN_GIVENS <= low <= high <= puzzles.MAX_GIVENS:
            raise ValueError(f"curriculum[{k}] = {stage}: need {puzzles.MIN_GIVENS} <= min_givens <= max_givens "
                             f"<= {puzzles.MAX_GIVENS}")
        checked.append((float(start), int(low), int(high)))
    return tuple(checked)


def options_of(data_config) -> SudokuDataOptions:
    return SudokuDataOptions(**dict(data_config.options))


class SudokuSource:
    """Example i is a pure function of (seed, i) (so a resumed run sees the same data): its givens count drawn
    from the curriculum's stage for i (default: [min_givens, max_givens]), then a puzzle generated on the TRAIN
    side of the split rule or picked from `base_pool` (TRAIN side only), then, if `augmented`, a random
    symmetry; training never sees an evaluation solution grid, nor one equivalent to it."""

    def __init__(self, *, num_examples: int, seed: int, min_givens: int, max_givens: int, seq_length: int,
                 block_size: int, sudoku_format: SudokuFormat | None = None, base_pool: pool.Pool | None = None,
                 augmented: bool = False, curriculum: tuple[tuple[float, int, int], ...] = (),
                 clamp_givens: bool = False):
        self.format = sudoku_format or CompactFormat()
        self.clamp_givens = clamp_givens
        self.num_examples, self.seed = num_examples, seed
        self.min_givens, self.max_givens = min_givens, max_givens
        self.seq_length, self.block_size = seq_length, block_size
        self.base_pool, self.augmented, self.curriculum = base_pool, augmented, _checked_curriculum(curriculum)
        # A curriculum is keyed on the example's position in the training stream: ask to be read in stream order
        # (source index = stream index), not shuffled over the source index.
        self.stream_ordered = bool(self.curriculum)
        if base_pool is not None:
            ranges = [stage[1:] for stage in self.curriculum] or [(min_givens, max_givens)]
            for low, high in ranges:
                if not base_pool.spec.min_givens <= low <= high <= base_pool.spec.max_givens:
                    raise ValueError(f"givens [{low}, {high}] are outside the pool's [{base_pool.spec.min_givens}, "
                                     f"{base_pool.spec.max_givens}]")
        empty = np.zeros((9, 9), np.int64)
        answer_length = len(self.format.answer_ids(empty + 1))
        needed = len(self.format.prompt_ids(empty)) + -(-answer_length // block_size) * block_size
        if seq_length < needed:
            raise ValueError(f"data.seq_length = {seq_length} cannot hold a Sudoku prompt and its block-filled "
                             f"answer ({needed} tokens)")

    def __len__(self) -> int:
        return self.num_examples

    def givens_range(self, index: int) -> tuple[int, int]:
        """[min, max] givens of example `index`: its curriculum stage's, else the source's."""
        if not self.curriculum:
            return self.min_givens, self.max_givens
        fraction = index / self.num_examples
        return next(stage for stage in reversed(self.curriculum) if stage[0] <= fraction)[1:]

    def puzzle(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        low, high = self.givens_range(index)
        givens = int(rng.integers(low, high + 1))
        if self.base_pool is not None:
            puzzle, solution = self.base_pool.pick(givens, int(rng.integers(self.base_pool.spec.per_givens)))
        else:
            while True:
                puzzle, solution = puzzles.generate_puzzle(rng, givens)
                if puzzles.solution_split(solution) == "train":
                    break
        if self.augmented:
            puzzle, solution = augment.augment(puzzle, solution, rng)
        return puzzle, solution

    def __getitem__(self, index: int) -> SftExample:
        puzzle, solution = self.puzzle(index)
        return pack_example(self.format.prompt_ids(puzzle), self.format.answer_ids(solution),
                            eos_id=self.format.eos_id, pad_id=self.format.pad_id, seq_length=self.seq_length,
                            block_size=self.block_size,
                            clamped=clamp.given_positions(self.format, puzzle) if self.clamp_givens else None)


def build(data_config, tokenizer) -> SudokuSource:
    options = options_of(data_config)
    return SudokuSource(num_examples=data_config.num_synthetic_examples, seed=data_config.shuffle_seed,
                        min_givens=options.min_givens, max_givens=options.max_givens,
                        seq_length=data_config.seq_length, block_size=data_config.block_size,
                        sudoku_format=make_format(options.format, tokenizer),
                        base_pool=pool_of(options, data_config.shuffle_seed), augmented=options.augment,
                        curriculum=options.curriculum, clamp_givens=options.clamp_givens)


def pool_of(options: SudokuDataOptions, seed: int) -> pool.Pool | None:
    """The options' pool (from the cache, or built now), or None without one."""
    if not options.pool_per_givens:
        return None
    low, high = options.givens_range
    spec = pool.PoolSpec(per_givens=options.pool_per_givens, min_givens=low, max_givens=high, seed=seed)
    workers = options.pool_workers or _cpu_count()
    return pool.load_or_generate(spec, cache_dir=options.pool_cache_dir or None, workers=workers)


def _cpu_count() -> int:
    """The cores this process may run on (the affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def own_tokenizer(data_config):
    """The compact format defines its vocabulary (and the checkpoint carries it); the chat format uses the
    run's text tokenizer."""
    return CompactFormat.tokenizer() if options_of(data_config).format == "compact" else None


def renders_text(data_config) -> bool:
    return options_of(data_config).format == "chat"
