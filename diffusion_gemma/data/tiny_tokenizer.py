"""Build a small byte-level BPE `tokenizer.json` from chat JSONL, for CPU-sized runs without the Gemma vocabulary.

Ids follow Gemma's special-token layout (pad 0, eos 1, bos 2) and include the chat markers `<|turn>` and
`<turn|>`, so the same chat rendering and EOS fill apply as with the real tokenizer.

    python -m diffusion_gemma.data.tiny_tokenizer --input=configs/data/tiny_chat.jsonl \\
        --output=configs/data/tiny_tokenizer.json --vocab_size=512
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable

from diffusion_gemma.atomic_write import atomic_path, check_new
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
    check_new(output_path, overwrite=overwrite, inputs=[input_path])  # before the training, not after
    tokenizer = build_tokenizer(chat_texts(input_path), vocab_size)
    with atomic_path(output_path, overwrite=overwrite, inputs=[input_path]) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tokenizer.to_str(pretty=False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="chat JSONL to learn the vocabulary from")
    parser.add_argument("--output", required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab_size", type=int, default=512, help="vocabulary size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        write_tokenizer(args.input, args.output, args.vocab_size, overwrite=args.overwrite)
    except (OSError, ValueError) as err:  # ChatFormatError is a ValueError; both name the file
        sys.exit(f"error: {err}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
