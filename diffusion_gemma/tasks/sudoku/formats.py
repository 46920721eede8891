"""How a Sudoku puzzle becomes a prompt and its solution a supervised answer, and back.

Two formats, one interface, so training, evaluation and the notebooks share them:
- `CompactFormat`: for from-scratch models. Ids pad 0, eos 1, bos 2, digit d -> 3 + d (vocabulary 16);
  prompt = `<bos>` + the 81 cells (0 = blank), answer = the 81 solution cells (exactly one 81-token canvas).
  `CompactFormat.tokenizer()` writes these ids as a HuggingFace tokenizer marked as this task's (`TASK`), which
  a training run's checkpoint carries: tools that expect text can then point at the Sudoku one instead.
- `ChatFormat`: the released model's chat prompt (Hackable Diffusion's `sft_sudoku` recipe) rendered with the
  Gemma 4 chat template: a system turn with the instruction, a user turn with the puzzle as 81 space-separated
  digits, and the answer as 81 space-separated digits.
"""

from __future__ import annotations

import abc
import re

import numpy as np

from diffusion_gemma.data import chat
from diffusion_gemma.data.tokenizer import TASK_KEY, HuggingFaceTokenizer

# What a compact-vocabulary model's tokenizer_config.json says about it (data.tokenizer.TASK_KEY).
TASK = {"name": "sudoku", "format": "compact", "evaluate": "experiments/sudoku/evaluate.py"}
SYSTEM_PROMPT = ("Solve the following Sudoku puzzle. Empty cells are represented by 0. Output ONLY the solved "
                 "puzzle immediately as a 9x9 grid of numbers separated by spaces. Do not include ####, "
                 "explanations, or any other text.")
FORMATS = ("compact", "chat")


class SudokuFormat(abc.ABC):
    """prompt ids <-> puzzle, answer ids <-> solution. `parse_answer` never fails: unreadable cells are 0
    (blank), so a garbled answer scores as incomplete instead of crashing an evaluation."""

    eos_id: int
    pad_id: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer when decoding."""
        return (self.eos_id,)

    @abc.abstractmethod
    def prompt_ids(self, puzzle) -> list[int]: ...

    @abc.abstractmethod
    def answer_ids(self, solution) -> list[int]: ...

    @abc.abstractmethod
    def parse_answer(self, ids) -> np.ndarray: ...


class CompactFormat(SudokuFormat):
    PAD, EOS, BOS = 0, 1, 2
    DIGIT_OFFSET = 3
    VOCAB_SIZE = 16
    PROMPT_LENGTH = 82
    ANSWER_LENGTH = 81
    eos_id, pad_id = EOS, PAD
    # One token per id: the specials, the digits '0'-'9' at DIGIT_OFFSET.., then <unk> and two unused ids.
    TOKENS = ("<pad>", "<eos>", "<bos>", *"0123456789", "<unk>", "<unused0>", "<unused1>")

    @classmethod
    def tokenizer(cls) -> HuggingFaceTokenizer:
        """The compact ids as a `tokenizers` WordLevel tokenizer: text is read digit by digit (whitespace
        ignored), decoded without separators, and anything else is <unk>. Its tokenizer_config.json carries
        TASK."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(cls.TOKENS)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                         pre_tokenizers.Digits(individual_digits=True)])
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
        return HuggingFaceTokenizer(None, backend=backend, tokenizer_config={"unk_token": "<unk>", TASK_KEY: TASK})

    def prompt_ids(self, puzzle) -> list[int]:
        return [self.BOS] + (_grid(puzzle).reshape(-1) + self.DIGIT_OFFSET).tolist()

    def answer_ids(self, solution) -> list[int]:
        return (_grid(solution).reshape(-1) + self.DIGIT_OFFSET).tolist()

    def parse_answer(self, ids) -> np.ndarray:
        cells = np.zeros(81, np.int64)
        ids = np.asarray(ids, np.int64).reshape(-1)[:81]
        digits = ids - self.DIGIT_OFFSET
        ok = (digits >= 1) & (digits <= 9)
        cells[: len(ids)][ok] = digits[ok]
        return cells.reshape(9, 9)


class ChatFormat(SudokuFormat):
    """The released model's format. The tokenizer is the checkpoint's (anything with encode/decode/require_id
    and bos/eos/pad ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    @staticmethod
    def spaced(grid) -> str:
        return " ".join(str(int(d)) for d in _grid(grid).reshape(-1))

    def turns(self, puzzle, solution=None) -> list[chat.ChatTurn]:
        answer = self.spaced(solution) if solution is not None else ""
        return [chat.ChatTurn("system", SYSTEM_PROMPT), chat.ChatTurn("user", self.spaced(puzzle)),
                chat.ChatTurn("assistant", answer)]

    def prompt_ids(self, puzzle) -> list[int]:
        return chat.prompt_and_answer_ids(self.turns(puzzle), self.tokenizer)[0]

    def answer_ids(self, solution) -> list[int]:
        # The answer does not depend on the puzzle's text; any 81-cell grid renders the same prompt length.
        return chat.prompt_and_answer_ids(self.turns(solution, solution), self.tokenizer)[1]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        turn_end = _maybe_id(self.tokenizer, chat.TURN_END)
        return (self.eos_id,) + ((turn_end,) if turn_end is not None else ())

    def parse_answer(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        stop = set(self.stop_ids) | {self.pad_id}
        kept = []
        for token in ids:
            if token in stop:
                break
            kept.append(token)
        digits = [int(ch) for ch in re.findall(r"[0-9]", self.tokenizer.decode(kept))][:81]
        cells = np.zeros(81, np.int64)
        cells[: len(digits)] = digits
        return cells.reshape(9, 9)


def default_format_name(vocab_size: int) -> str:
    """'compact' for a model with the compact vocabulary (16 ids), 'chat' for any other (a tokenizer's)."""
    return "compact" if vocab_size == CompactFormat.VOCAB_SIZE else "chat"


def check_vocabulary(fmt: SudokuFormat, vocab_size: int) -> None:
    """Every id the format can emit must exist in the model: a tokenizer that is not the model's fails here,
    not as garbage answers."""
    empty, full = np.zeros((9, 9), np.int64), np.full((9, 9), 9, np.int64)
    ids = [*fmt.prompt_ids(empty), *fmt.prompt_ids(full)]
    for digit in range(1, 10):
        ids += fmt.answer_ids(np.full((9, 9), digit, np.int64))
    ids += [*fmt.stop_ids, fmt.pad_id]
    largest = max(ids)
    if largest >= vocab_size:
        raise ValueError(f"the {type(fmt).__name__} uses token id {largest}, outside the model's vocabulary of "
                         f"{vocab_size}: is the tokenizer the model's (or the format the one it was trained on)?")


def make_format(name: str, tokenizer=None) -> SudokuFormat:
    if name == "compact":
        return CompactFormat()
    if name == "chat":
        if tokenizer is None:
            raise ValueError("the chat Sudoku format needs a tokenizer (data.tokenizer)")
        return ChatFormat(tokenizer)
    raise ValueError(f"Sudoku format {name!r}; expected one of {FORMATS}")


def _maybe_id(tokenizer, token: str):
    try:
        return tokenizer.require_id(token)
    except Exception:  # noqa: BLE001 - a tokenizer without turn markers simply has no turn-end stop
        return None


def _grid(grid) -> np.ndarray:
    array = np.asarray(grid, np.int64)
    if array.size != 81:
        raise ValueError(f"a Sudoku grid needs 81 cells, got shape {array.shape}")
    if array.min() < 0 or array.max() > 9:
        raise ValueError("Sudoku cells must be digits 0-9")
    return array.reshape(9, 9)
