"""Tokenizer loaders and the one Gemma 4 chat renderer (`data/chat.py`) that training, generation and evaluation
share, on tiny tokenizers trained here (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

from diffusion_gemma.data import chat, tiny_tokenizer
from diffusion_gemma.data.chat import TURN_END, TURN_START
from diffusion_gemma.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

CORPUS = ["the sky is blue because of rayleigh scattering", "why is the sky blue", "sudoku puzzles have rules",
          "hello world", "the model answers the user", "blue green red yellow"] * 4
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", TURN_START, TURN_END]
TINY_CHAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data",
                         "tiny_chat.jsonl")


def build_hf_tokenizer(directory: str) -> str:
    """A byte-level BPE tokenizer.json with Gemma's special tokens at ids 0..5 (pad, eos, bos, unk, turn markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    return path


def build_sentencepiece(directory: str) -> str:
    """A BPE sentencepiece model set up like Gemma's: identity normalisation, no dummy prefix, byte fallback."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=300, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=[TURN_START, TURN_END],
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, byte_fallback=True, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    return build_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tok")))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return build_sentencepiece(str(tmp_path_factory.mktemp("sp_tok")))


def test_huggingface_tokenizer_ids_and_round_trip(hf_path):
    tok = load_tokenizer(os.path.dirname(hf_path))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.token_to_id(TURN_START) == 4 and tok.token_to_id(TURN_END) == 5
    assert tok.token_to_id("<no such token>") is None
    text = "why is the sky blue"
    ids = tok.encode(text)
    assert tok.bos_id not in ids  # encode adds no special tokens
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text  # specials skipped
    assert tok.vocab_size >= 6


def test_sentencepiece_tokenizer_ids_and_round_trip(sp_path):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.token_to_id(TURN_START) == 4 and tok.token_to_id(TURN_END) == 5
    assert tok.token_to_id("<no such token>") is None
    text = "the sky is blue"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_chat_rendering_matches_the_full_template(kind, hf_path, sp_path):
    """Placing the turn markers by id equals tokenizing the rendered single-turn template in one go."""
    tok = load_tokenizer(hf_path if kind == "hf" else sp_path)
    prompt = "why is the sky blue"
    ids = chat.user_prompt_ids(tok, prompt)
    rendered = f"{TURN_START}user\n{prompt}{TURN_END}\n{TURN_START}model\n"
    assert ids == [tok.bos_id] + tok.encode(rendered)
    assert ids[:2] == [tok.bos_id, tok.token_to_id(TURN_START)]
    assert ids.count(tok.token_to_id(TURN_START)) == 2 and ids.count(tok.token_to_id(TURN_END)) == 1
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "").startswith(
        ("<bos>" if kind == "hf" else "") + TURN_START)


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_generation_prompt_is_the_training_prompt(kind, hf_path, sp_path):
    """What `generate` and the samples evaluator feed the model for a user message is, token for token, the prompt
    training builds for a one-user-turn conversation; the answer follows it with its turn closed."""
    tok = load_tokenizer(hf_path if kind == "hf" else sp_path)
    question, reply = "why is the sky blue", "rayleigh scattering"
    prompt, answer = chat.prompt_and_answer_ids(
        [chat.ChatTurn("user", question), chat.ChatTurn("assistant", reply)], tok)
    assert prompt == chat.user_prompt_ids(tok, question)
    assert answer == tok.encode(f"{reply}{TURN_END}\n")


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_training_prompt_of_a_conversation_matches_the_full_template(kind, hf_path, sp_path):
    """System and earlier turns, assistant written `model`, up to the header of the last assistant turn."""
    tok = load_tokenizer(hf_path if kind == "hf" else sp_path)
    turns = [chat.ChatTurn("system", "answer briefly"), chat.ChatTurn("user", "hello world"),
             chat.ChatTurn("assistant", "the sky is blue"), chat.ChatTurn("user", "why"),
             chat.ChatTurn("assistant", "rayleigh scattering")]
    prompt, _ = chat.prompt_and_answer_ids(turns, tok)
    rendered = (f"{TURN_START}system\nanswer briefly{TURN_END}\n{TURN_START}user\nhello world{TURN_END}\n"
                f"{TURN_START}model\nthe sky is blue{TURN_END}\n{TURN_START}user\nwhy{TURN_END}\n{TURN_START}model\n")
    assert prompt == [tok.bos_id] + tok.encode(rendered)
    assert prompt == chat.prompt_ids(turns[:-1], tok)


def test_tiny_tokenizer_builds_a_chat_vocabulary(tmp_path):
    """`data/tiny_tokenizer` learns a vocabulary with Gemma's special-token layout and the turn markers, so the chat
    renderer applies unchanged; it refuses to replace its output unless told to."""
    output = str(tmp_path / "tokenizer.json")
    tiny_tokenizer.write_tokenizer(TINY_CHAT, output, vocab_size=300)
    tok = load_tokenizer(output)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.token_to_id(TURN_START), tok.token_to_id(TURN_END)) == (3, 4)
    ids = chat.user_prompt_ids(tok, "how many coins")
    assert tok.decode(ids, skip_special_tokens=False) == f"<bos>{TURN_START}user\nhow many coins{TURN_END}\n" \
                                                         f"{TURN_START}model\n"
    with pytest.raises(FileExistsError, match="--overwrite"):
        tiny_tokenizer.write_tokenizer(TINY_CHAT, output, vocab_size=300)
    tiny_tokenizer.write_tokenizer(TINY_CHAT, output, vocab_size=280, overwrite=True)
    assert load_tokenizer(output).vocab_size == 280


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_special_ids_can_be_given(hf_path):
    tok = load_tokenizer(hf_path, eos_id=5)
    assert tok.eos_id == 5
    with pytest.raises(TokenizerError, match="no '<start_of_turn>' token"):
        tok.require_id("<start_of_turn>")
