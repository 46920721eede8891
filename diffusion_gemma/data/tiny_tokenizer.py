"""Build a small byte-level BPE `tokenizer.json` from chat JSONL, for CPU-sized runs without the Gemma vocabulary.

Ids follow Gemma's special-token layout (pad 0, eos 1, bos 2) and include the chat markers `<|turn>` and
`<turn|>`, so the same chat rendering and EOS fill apply as with the real tokenizer.

    python -m diffusion_gemma.data.tiny_tokenizer --input=configs/data/tiny_chat.jsonl \\
        --output=configs/data/tiny_tokenizer.json --vocab_size=512
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

from absl import app, flags

from diffusion_gemma.data.chat import TURN_END, TURN_START, read_chat_jsonl

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", TURN_START, TURN_END)


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def chat_texts(path: str) -> Iterable[str]:
    for turns in read_chat_jsonl(path):
        for turn in turns:
            yield f"{turn.role}\n{turn.content}\n"


def write_tokenizer(input_path: str, output_path: str, vocab_size: int, *, overwrite: bool = False) -> None:
    if os.path.exists(output_path) and not overwrite:
        raise FileExistsError(f"{output_path} exists; pass --overwrite to replace it")
    tokenizer = build_tokenizer(chat_texts(input_path), vocab_size)
    directory = os.path.dirname(os.path.abspath(output_path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
        tmp.write(tokenizer.to_str(pretty=False))
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, output_path)


_INPUT = flags.DEFINE_string("input", None, "chat JSONL to learn the vocabulary from")
_OUTPUT = flags.DEFINE_string("output", None, "tokenizer.json to write")
_VOCAB = flags.DEFINE_integer("vocab_size", 512, "vocabulary size")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output")


def main(argv):
    del argv
    write_tokenizer(_INPUT.value, _OUTPUT.value, _VOCAB.value, overwrite=_OVERWRITE.value)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)
