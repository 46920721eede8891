"""Tokenizers for prompting and decoding: a small `Tokenizer` interface over a HuggingFace `tokenizer.json` (the
`tokenizers` library) or a sentencepiece model. The chat template is rendered by `data/chat.py`.

`encode` adds no special tokens of its own (the caller places `<bos>`), but special tokens written in the text,
such as `<|turn>`, are recognised as such. `load_tokenizer(path)` takes a file or a checkpoint directory;
`Tokenizer.save(directory)` writes the files a training checkpoint carries (and an export ships), so the model
and its tokenizer travel together.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files of a HuggingFace directory that belong to its tokenizer and travel with it.
COMPANION_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
# A tokenizer_config.json key marking a vocabulary that encodes a task's data, not text:
# {"name": ..., "format": ..., "evaluate": the tool that runs such a model}.
TASK_KEY = "diffusion_gemma_task"

# Names tried, in order, for the special tokens when the caller does not give their ids.
_BOS_NAMES = ("<bos>", "<s>")
_EOS_NAMES = ("<eos>", "</s>")
_PAD_NAMES = ("<pad>",)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (missing, unknown format, or lacking a needed token)."""


class Tokenizer(abc.ABC):
    """encode(text) -> ids, decode(ids) -> text, the bos/eos/pad ids and a vocabulary lookup."""

    bos_id: int
    eos_id: int
    pad_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Implemented by each tokenizer backend."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Implemented by each tokenizer backend."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Implemented by each tokenizer backend."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Implemented by each tokenizer backend."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Write the files that load this tokenizer again (`load_tokenizer(directory)`) into `directory`."""

    def require_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no {token!r} token")
        return token_id

    def _special_id(self, given: int | None, names: Sequence[str], what: str) -> int:
        if given is not None:
            return int(given)
        for name in names:
            token_id = self.token_to_id(name)
            if token_id is not None:
                return token_id
        raise TokenizerError(f"no {what} token found (tried {list(names)}); pass its id explicitly")


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` library (Gemma 4 ships one: BPE with byte fallback)."""

    def __init__(self, path: str | None, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, backend=None, tokenizer_config: Mapping[str, Any] | None = None):
        """A `tokenizer.json` file, or (`path` None) a `tokenizers.Tokenizer` built in memory as `backend`;
        `tokenizer_config`: entries `save` writes into tokenizer_config.json."""
        from tokenizers import Tokenizer as RustTokenizer

        if backend is None:
            try:
                backend = RustTokenizer.from_file(os.fspath(path))
            except Exception as err:  # the Rust library raises a bare Exception for unreadable files
                raise TokenizerError(f"{path}: not a tokenizer.json ({err})") from None
        self._tokenizer = backend
        self.path = os.fspath(path) if path is not None else None
        self._config = dict(tokenizer_config or {})
        self.bos_id = self._special_id(bos_id, _BOS_NAMES, "BOS")
        self.eos_id = self._special_id(eos_id, _EOS_NAMES, "EOS")
        self.pad_id = self._special_id(pad_id, _PAD_NAMES, "pad")

    def save(self, directory: str) -> None:
        """tokenizer.json, the companion files of an HF directory's, and a tokenizer_config.json that lets
        transformers' AutoTokenizer load it (written when none came with it)."""
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, TOKENIZER_JSON)
        if self.path is not None:
            shutil.copyfile(self.path, target)
            _copy_companions(self.path, TOKENIZER_JSON, directory)
        else:
            self._tokenizer.save(target)
        config_path = os.path.join(directory, TOKENIZER_CONFIG)
        if not os.path.exists(config_path):
            token = self._tokenizer.id_to_token
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(self.bos_id),
                      "eos_token": token(self.eos_id), "pad_token": token(self.pad_id), **self._config}
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Gemma's `tokenizer.model`)."""

    def __init__(self, path: str, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(os.fspath(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{path}: not a sentencepiece model ({err})") from None
        self.path = os.fspath(path)
        processor = self._processor
        self.bos_id = bos_id if bos_id is not None else self._own_or_named(processor.bos_id(), _BOS_NAMES, "BOS")
        self.eos_id = eos_id if eos_id is not None else self._own_or_named(processor.eos_id(), _EOS_NAMES, "EOS")
        self.pad_id = pad_id if pad_id is not None else self._own_or_named(processor.pad_id(), _PAD_NAMES, "pad")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.path, os.path.join(directory, SENTENCEPIECE_MODEL))
        _copy_companions(self.path, SENTENCEPIECE_MODEL, directory)

    def _own_or_named(self, own: int, names: Sequence[str], what: str) -> int:
        return own if own >= 0 else self._special_id(None, names, what)

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self._processor.EncodeAsIds(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self._processor.IsControl(i) or self._processor.IsUnknown(i))
                   and i not in (self.bos_id, self.eos_id, self.pad_id)]
        return self._processor.DecodeIds(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._processor.PieceToId(token)
        if token_id == self._processor.unk_id() and token != self._processor.IdToPiece(token_id):
            return None
        return token_id


def _copy_companions(path: str, canonical_name: str, directory: str) -> None:
    """The COMPANION_FILES beside `path` when it is an HF directory's tokenizer (has its canonical name): a
    stand-alone file's neighbours are not its own."""
    if os.path.basename(path) != canonical_name:
        return
    for name in COMPANION_FILES:
        source = os.path.join(os.path.dirname(path), name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))


def vocabulary_task(path: str) -> dict[str, Any] | None:
    """The TASK_KEY entry of the tokenizer_config.json in `path` (a directory, or beside a tokenizer file), or
    None: the vocabulary is text."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{config_path}: invalid JSON ({err})") from None
    task = config.get(TASK_KEY) if isinstance(config, dict) else None
    return dict(task) if isinstance(task, Mapping) else None


def find_tokenizer_file(path: str) -> str | None:
    """`path` itself if it is a file, else its tokenizer.json or tokenizer.model (in that order), else None."""
    if os.path.isfile(path):
        return path
    for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_tokenizer(path: str, **special_ids) -> Tokenizer:
    """A `tokenizer.json` / sentencepiece model file, or a directory holding one. `special_ids` (bos_id, eos_id,
    pad_id) override the ids found by token name."""
    found = find_tokenizer_file(os.fspath(path))
    if found is None:
        raise TokenizerError(f"{path}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
    if found.endswith(".json"):
        return HuggingFaceTokenizer(found, **special_ids)
    return SentencePieceTokenizer(found, **special_ids)
