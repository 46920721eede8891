"""The Gemma 4 chat template, rendered once for training, generation and evaluation, and chat JSONL -> SFT examples.

Training (`prompt_and_answer_ids`) and generation (`user_prompt_ids`) build their prompts with the same
`prompt_ids`, so a prompt at inference is token for token the prompt the model was trained on.

Rendering (Gemma 4): `<bos>` [`<|turn>system\\n` S `<turn|>\\n`] then per turn `<|turn>ROLE\\n` TEXT `<turn|>\\n`,
with the assistant role written `model`. Only the LAST assistant turn is supervised: its text + `<turn|>\\n`;
its header `<|turn>model\\n` belongs to the prompt (supervising it teaches the model to re-emit the header).
The response is EOS-filled up to the next multiple of the block size counted from the response start; beyond
that is padding (not attended, not supervised).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Protocol, Sequence

import numpy as np

# The turn markers of the Gemma 4 chat template (special tokens of its vocabulary).
TURN_START = "<|turn>"
TURN_END = "<turn|>"
# Chat roles as the template writes them: the assistant is `model`.
ROLES = {"system": "system", "user": "user", "assistant": "model", "model": "model"}


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def require_id(self, token: str) -> int: ...


class ChatFormatError(ValueError):
    """A malformed chat record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One tokenized example: `tokens` [S] with `supervised` and `attention` masks, `response_start` = prefix.

    `clamped` [S] marks response tokens known in advance (infilling): the model is given them clean and is not
    scored on them. Not given: all False.
    """

    tokens: np.ndarray
    supervised: np.ndarray
    attention: np.ndarray
    response_start: int
    clamped: np.ndarray | None = None

    def __post_init__(self):
        if self.clamped is None:
            object.__setattr__(self, "clamped", np.zeros(np.shape(self.supervised), bool))


def _turn_ids(tokenizer: TextTokenizer, role: str, content: str, *, close: bool = True) -> list[int]:
    """`<|turn>ROLE\n CONTENT <turn|>\n`; the markers are placed by id, so the text between them is tokenized
    exactly as a full render would be (tokenizers split their input at special tokens first) even when a
    tokenizer treats the markers as control symbols that never come out of `encode`."""
    ids = [tokenizer.require_id(TURN_START)] + list(tokenizer.encode(f"{ROLES[role]}\n{content}"))
    return ids + _turn_close_ids(tokenizer) if close else ids


def _turn_close_ids(tokenizer: TextTokenizer) -> list[int]:
    """`<turn|>\n`, which ends every turn (and so the supervised answer)."""
    return [tokenizer.require_id(TURN_END)] + list(tokenizer.encode("\n"))


def prompt_ids(turns: Sequence[ChatTurn], tokenizer: TextTokenizer) -> list[int]:
    """`<bos>`, every turn, then the `<|turn>model\n` header: the model's next tokens are its answer."""
    ids = [tokenizer.bos_id]
    for turn in turns:
        ids += _turn_ids(tokenizer, turn.role, turn.content)
    return ids + _turn_ids(tokenizer, "model", "", close=False)


def user_prompt_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """One user turn ready for the model to answer: `<bos><|turn>user\n{text}<turn|>\n<|turn>model\n`."""
    return prompt_ids([ChatTurn("user", text)], tokenizer)


def prompt_and_answer_ids(turns: Sequence[ChatTurn], tokenizer: TextTokenizer) -> tuple[list[int], list[int]]:
    """Prompt ids (`prompt_ids` of every turn before the last assistant turn) and the supervised answer ids
    (that turn's content + `<turn|>\n`)."""
    last = max((i for i, turn in enumerate(turns) if ROLES[turn.role] == "model"), default=None)
    if last is None:
        raise ChatFormatError("conversation has no assistant turn to supervise")
    prompt = prompt_ids(turns[:last], tokenizer)
    answer = list(tokenizer.encode(turns[last].content)) + _turn_close_ids(tokenizer)
    return prompt, answer


def tokenize_example(turns: Sequence[ChatTurn], tokenizer: TextTokenizer, *, seq_length: int,
                     block_size: int) -> SftExample:
    """EOS-fill the response to a block multiple (counted from the response start), truncate to `seq_length`
    and pad. Prompt and answer are tokenized separately so the supervised span starts exactly at the answer."""
    prompt, answer = prompt_and_answer_ids(turns, tokenizer)
    return pack_example(prompt, answer, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seq_length=seq_length,
                        block_size=block_size)


def pack_example(prompt: Sequence[int], answer: Sequence[int], *, eos_id: int, pad_id: int, seq_length: int,
                 block_size: int, clamped: Sequence[int] | None = None) -> SftExample:
    """prompt + answer + EOS fill (supervised, attended) + pad (neither), truncated to `seq_length`.

    `clamped`: answer-relative positions (0 = the answer's first token) whose tokens are given to the model;
    each must lie in the answer (not the EOS fill). Positions cut off by `seq_length` are dropped with them.
    """
    filled_length = -(-len(answer) // block_size) * block_size
    response = list(answer) + [eos_id] * (filled_length - len(answer))
    sequence = (list(prompt) + response)[:seq_length]
    tokens = np.full((seq_length,), pad_id, np.int32)
    supervised = np.zeros((seq_length,), bool)
    attention = np.zeros((seq_length,), bool)
    tokens[: len(sequence)] = sequence
    attention[: len(sequence)] = True
    supervised[len(prompt): len(sequence)] = True
    clamp = np.zeros((seq_length,), bool)
    if clamped is not None:
        offsets = np.asarray(clamped, np.int64).reshape(-1)
        outside = offsets[(offsets < 0) | (offsets >= len(answer))]
        if outside.size:
            raise ValueError(f"clamped answer position {int(outside[0])} is outside the answer of {len(answer)} "
                             "tokens")
        positions = len(prompt) + offsets
        clamp[positions[positions < seq_length]] = True
    return SftExample(tokens=tokens, supervised=supervised, attention=attention,
                      response_start=min(len(prompt), seq_length), clamped=clamp)


def parse_record(line: str, *, path: str, line_number: int) -> list[ChatTurn]:
    """One JSONL line in OpenAI messages format -> turns; errors name the file and line."""
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ChatFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: expected an object with a non-empty 'messages' list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatFormatError(f"{where}: messages[{i}] needs a string 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: messages[{i}].role = {role!r}; expected one of {sorted(ROLES)}")
        turns.append(ChatTurn(role, message["content"]))
    if not any(ROLES[t.role] == "model" for t in turns):
        raise ChatFormatError(f"{where}: no assistant message to supervise")
    return turns


def read_chat_jsonl(path: str) -> Iterator[list[ChatTurn]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield parse_record(line, path=path, line_number=line_number)
