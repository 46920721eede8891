"""grain input pipelines: example sources -> shuffled, per-process, batched SFT examples with global indices.

Every example carries its global index in the data stream (`example_index`), which keys all of its training
randomness: the noise is independent of how the batch is split across devices and processes, and a resumed
run (the iterator state is saved in checkpoints) sees exactly the data and noise of an uninterrupted one.
Every batch carries `clamped_mask` (all False unless a source clamps known answer tokens).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Protocol

import grain
import numpy as np

from diffusion_gemma import registry
from diffusion_gemma.data import chat
from diffusion_gemma.data.chat import SftExample


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """`source`: a registered data source (`diffusion_gemma.registry.DATA_SOURCES`): synthetic (a learnable copy
    task, for smoke runs), chat_jsonl (OpenAI messages, needs `path` and `tokenizer`), or a task's. `options`
    are the source's own settings, checked by it. `seq_length` is the fixed row length (prompt + block-filled
    response); `num_synthetic_examples` the size of a generated source. `prefetch_workers` > 0 builds the batches
    in that many worker processes (one batch each in turn, so the stream and its saved position are the same as
    with none; a run resumes only with the count it saved with): for a source whose examples cost more than the
    step (generated puzzles at an accelerator's batch)."""

    source: str = "synthetic"
    path: str | None = None
    tokenizer: str | None = None
    seq_length: int = 64
    block_size: int = 16
    global_batch_size: int = 8
    shuffle_seed: int = 0
    num_synthetic_examples: int = 4096
    synthetic_vocab_size: int = 64
    prefetch_workers: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        registry.DATA_SOURCES.get(self.source, where="data.source").check(dict(self.options), where="data.options")
        if self.source == "chat_jsonl" and (not self.path or not self.tokenizer):
            raise ValueError("data.source = 'chat_jsonl' needs data.path and data.tokenizer")
        for name in ("seq_length", "block_size", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.prefetch_workers < 0:
            raise ValueError(f"data.prefetch_workers must be >= 0 (0: batches built in the training process), got "
                             f"{self.prefetch_workers}")


class ExampleSource(Protocol):
    """A sized, indexable set of examples. A source may also set `stream_ordered = True`: it is then read by the
    global stream index without shuffling (`make_dataset`), for sources that schedule on the index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SftExample: ...


class ChatJsonlSource:
    """Chat JSONL records, validated eagerly (a malformed line fails before training starts, naming the file
    and line) and tokenized on access."""

    def __init__(self, path: str, tokenizer: chat.TextTokenizer, *, seq_length: int, block_size: int):
        self.records = list(chat.read_chat_jsonl(path))
        if not self.records:
            raise chat.ChatFormatError(f"{path}: no examples")
        self.tokenizer, self.seq_length, self.block_size = tokenizer, seq_length, block_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SftExample:
        return chat.tokenize_example(self.records[index], self.tokenizer, seq_length=self.seq_length,
                                     block_size=self.block_size)


class SyntheticSource:
    """A deterministic, learnable task for smoke runs: the prompt is a random token string (ids >= 3, so no
    special token), the answer is the same string reversed. Ids: pad 0, eos 1, bos 2."""

    def __init__(self, *, num_examples: int, vocab_size: int, seq_length: int, block_size: int, seed: int = 0):
        if vocab_size < 4:
            raise ValueError("data.synthetic_vocab_size must be >= 4")
        self.num_examples, self.vocab_size = num_examples, vocab_size
        self.seq_length, self.block_size, self.seed = seq_length, block_size, seed
        self.max_content = max(1, min(block_size - 1, (seq_length - 1) // 2 - 1))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> SftExample:
        rng = np.random.default_rng([self.seed, index])
        length = int(rng.integers(1, self.max_content + 1))
        content = rng.integers(3, self.vocab_size, size=length).tolist()
        return chat.pack_example([2] + content, content[::-1], eos_id=1, pad_id=0, seq_length=self.seq_length,
                                 block_size=self.block_size)


def _as_features(index: int, example: SftExample) -> dict[str, np.ndarray]:
    return {"input_ids": example.tokens, "attention_mask": example.attention, "supervised_mask": example.supervised,
            "clamped_mask": example.clamped, "response_start": np.int32(example.response_start),
            "example_index": np.int32(index)}


def batch_shapes(config: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each feature of a global batch (`make_dataset` over all rows) -> (shape, dtype), without reading data: what
    an ahead-of-time compile of the training step takes as its batch."""
    rows, length = (config.global_batch_size,), (config.global_batch_size, config.seq_length)
    return {"input_ids": (length, np.dtype(np.int32)), "attention_mask": (length, np.dtype(bool)),
            "supervised_mask": (length, np.dtype(bool)), "clamped_mask": (length, np.dtype(bool)),
            "response_start": (rows, np.dtype(np.int32)), "example_index": (rows, np.dtype(np.int32))}


def make_dataset(source: ExampleSource, config: DataConfig, *, num_steps: int,
                 rows: tuple[int, int] | None = None) -> grain.IterDataset:
    """Shuffle over as many epochs as `num_steps` needs, number the examples of the global stream, batch them
    `global_batch_size` at a time and keep rows [start, stop) of every batch: this process's share
    (`sharding.process_batch_rows`; default all). Each process reads only its own rows, and the processes'
    blocks side by side are exactly the single-process batch, row order included."""
    size = config.global_batch_size
    start, stop = (0, size) if rows is None else rows
    if not 0 <= start < stop <= size:
        raise ValueError(f"rows {rows} are not a block of the global batch of {size}")
    needed = (num_steps + 1) * size
    if getattr(source, "stream_ordered", False):
        # A source that draws every example afresh from its index and schedules on it (a curriculum) is read by
        # the global stream index, unshuffled: example i is then in step i // global_batch_size.
        dataset = grain.MapDataset.range(needed).map(source.__getitem__)
    else:
        epochs = max(1, -(-needed // len(source)))
        dataset = grain.MapDataset.source(source).repeat(epochs).shuffle(seed=config.shuffle_seed)
    dataset = dataset.map_with_index(_as_features)
    if stop - start < size:
        local, stream = stop - start, dataset
        dataset = grain.MapDataset.range(len(stream) // size * local).map(
            lambda i: stream[i // local * size + start + i % local])
    batches = dataset.batch(stop - start, drop_remainder=True).to_iter_dataset()
    if config.prefetch_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags, which only a CLI has parsed
            flags.FLAGS.mark_as_parsed()
        # Worker k builds batches k, k + n, ...: the order, and so the data, does not depend on n.
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.prefetch_workers))
    return batches


def make_source(config: DataConfig, tokenizer: chat.TextTokenizer | None = None) -> ExampleSource:
    """The registered source named by `data.source`, built from the config (and the run's tokenizer)."""
    return registry.DATA_SOURCES.get(config.source, where="data.source").build(config, tokenizer)


def _synthetic(config: DataConfig, tokenizer) -> SyntheticSource:
    return SyntheticSource(num_examples=config.num_synthetic_examples, vocab_size=config.synthetic_vocab_size,
                           seq_length=config.seq_length, block_size=config.block_size, seed=config.shuffle_seed)


def _chat_jsonl(config: DataConfig, tokenizer) -> ChatJsonlSource:
    if tokenizer is None:
        raise ValueError("data.source = 'chat_jsonl' needs a tokenizer")
    return ChatJsonlSource(config.path, tokenizer, seq_length=config.seq_length, block_size=config.block_size)


registry.DATA_SOURCES.register("synthetic", registry.DataSource(build=_synthetic))
registry.DATA_SOURCES.register("chat_jsonl", registry.DataSource(build=_chat_jsonl,
                                                                 renders_text=lambda config: True))


def iterator_state_json(iterator) -> str:
    return json.dumps(iterator.get_state())


class IteratorStateError(ValueError):
    """A checkpoint's data position that this pipeline cannot take (it was saved by a differently built one)."""


def restore_iterator_state(iterator, state_json: str) -> None:
    state = json.loads(state_json)
    try:
        iterator.set_state(state)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise IteratorStateError(f"the checkpoint's data position ({state_json[:120]}) does not fit this data "
                                 f"pipeline: resume with the data settings it was saved with (data.prefetch_workers "
                                 f"included); {type(err).__name__}: {err}") from None
