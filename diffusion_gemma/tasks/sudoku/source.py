"""The Sudoku training source: puzzles generated on the fly from the TRAIN side of the split rule, rendered in a
prompt format (`formats.py`) and packed as SFT examples.

Its settings are `data.options` (`SudokuDataOptions`); the generic `data` fields it reads are seq_length,
block_size, shuffle_seed (the generator's seed) and num_synthetic_examples (how many puzzles make an epoch).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_gemma.data.chat import SftExample, pack_example
from diffusion_gemma.tasks.sudoku import puzzles
from diffusion_gemma.tasks.sudoku.formats import FORMATS, CompactFormat, SudokuFormat, make_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class SudokuDataOptions:
    """`data.options` of the `sudoku` source: givens drawn uniformly in [min_givens, max_givens] per puzzle;
    `format` compact (a 16-id vocabulary, from-scratch models) or chat (the released model's prompt)."""

    min_givens: int = 30
    max_givens: int = 50
    format: str = "compact"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format = {self.format!r}; expected one of {FORMATS}")
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= min_givens <= max_givens <= 81, got {self.min_givens}, "
                             f"{self.max_givens}")


def options_of(data_config) -> SudokuDataOptions:
    return SudokuDataOptions(**dict(data_config.options))


class SudokuSource:
    """Example i is generated from seed [seed, i] on the TRAIN side of the split rule, so training never sees
    an evaluation solution grid."""

    def __init__(self, *, num_examples: int, seed: int, min_givens: int, max_givens: int, seq_length: int,
                 block_size: int, sudoku_format: SudokuFormat | None = None):
        self.format = sudoku_format or CompactFormat()
        self.num_examples, self.seed = num_examples, seed
        self.min_givens, self.max_givens = min_givens, max_givens
        self.seq_length, self.block_size = seq_length, block_size
        empty = np.zeros((9, 9), np.int64)
        answer_length = len(self.format.answer_ids(empty + 1))
        needed = len(self.format.prompt_ids(empty)) + -(-answer_length // block_size) * block_size
        if seq_length < needed:
            raise ValueError(f"data.seq_length = {seq_length} cannot hold a Sudoku prompt and its block-filled "
                             f"answer ({needed} tokens)")

    def __len__(self) -> int:
        return self.num_examples

    def puzzle(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        givens = int(rng.integers(self.min_givens, self.max_givens + 1))
        while True:
            puzzle, solution = puzzles.generate_puzzle(rng, givens)
            if puzzles.solution_split(solution) == "train":
                return puzzle, solution

    def __getitem__(self, index: int) -> SftExample:
        puzzle, solution = self.puzzle(index)
        return pack_example(self.format.prompt_ids(puzzle), self.format.answer_ids(solution),
                            eos_id=self.format.eos_id, pad_id=self.format.pad_id, seq_length=self.seq_length,
                            block_size=self.block_size)


def build(data_config, tokenizer) -> SudokuSource:
    options = options_of(data_config)
    return SudokuSource(num_examples=data_config.num_synthetic_examples, seed=data_config.shuffle_seed,
                        min_givens=options.min_givens, max_givens=options.max_givens,
                        seq_length=data_config.seq_length, block_size=data_config.block_size,
                        sudoku_format=make_format(options.format, tokenizer))


def own_tokenizer(data_config):
    """The compact format defines its vocabulary (and the checkpoint carries it); the chat format uses the
    run's text tokenizer."""
    return CompactFormat.tokenizer() if options_of(data_config).format == "compact" else None


def renders_text(data_config) -> bool:
    return options_of(data_config).format == "chat"
