"""`python -m diffusion_gemma.generate` on a tiny random HuggingFace checkpoint with a tiny tokenizer.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="builds the checkpoint with transformers (pip install -e .[dev])")
pytest.importorskip("transformers", reason="builds the checkpoint with transformers (pip install -e .[dev])")

from diffusion_gemma import generate as cli  # noqa: E402
from diffusion_gemma.cli import UsageError  # noqa: E402
from diffusion_gemma.data.tokenizer import load_tokenizer  # noqa: E402
from diffusion_gemma.checkpoints import loading  # noqa: E402
from cli_runs import run_flag_main  # noqa: E402
from hf_reference import FULL, make_reference  # noqa: E402
from test_tokenizer import build_hf_tokenizer  # noqa: E402

PROMPTS = ["why is the sky blue", "hello world"]
VOCAB = 320  # the byte-level test tokenizer has ~270 tokens


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli_model"))
    reference, _ = make_reference(path, seed=3, layers=1, layer_types=[FULL], canvas_length=8,
                                  vocab_size=VOCAB)
    with torch.no_grad():  # peaked predictions, so answers are not empty (as in test_sampler.py)
        reference.model.decoder.embed_tokens.weight.mul_(60.0)
    reference.save_pretrained(path)
    build_hf_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"max_new_tokens": 16, "max_denoising_steps": 4, "eos_token_id": [1, 5], "pad_token_id": 0}, f)
    return path


def test_load_reads_generation_config_and_falls_back_to_model_eos(hf_dir, tmp_path):
    loaded = loading.load(hf_dir=hf_dir)
    assert loaded.sampler_config().max_denoising_steps == 4 and loaded.sampler_config().eos_token_ids == (1, 5)
    assert loaded.tokenizer == os.path.join(hf_dir, "tokenizer.json")
    bare = str(tmp_path / "bare")
    shutil.copytree(hf_dir, bare)
    os.remove(os.path.join(bare, "generation_config.json"))
    fallback = loading.load(hf_dir=bare).sampler_config()
    assert fallback.max_denoising_steps == 48  # the reference's default
    assert fallback.eos_token_ids == loaded.model.config.eos_token_ids and fallback.pad_token_id == 0
    with pytest.raises(ValueError, match="exactly one"):
        loading.load()


def test_answer_prompts_batches_and_strips_eos(hf_dir):
    loaded = loading.load(hf_dir=hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    config = loaded.sampler_config()
    answers = cli.answer_prompts(loaded.model, tokenizer, PROMPTS, config, chat=True, seed=0, batch_size=2)
    assert [a.prompt for a in answers] == PROMPTS
    for answer in answers:
        assert not set(answer.token_ids) & (set(config.eos_token_ids) | {config.pad_token_id})
        assert len(answer.token_ids) <= 16 and answer.tokens_per_forward >= 0
        assert answer.text == tokenizer.decode(answer.token_ids)
        blocks = -(-config.max_new_tokens // loaded.model.config.canvas_length)  # 16 tokens / canvas 8 = 2
        # A random model is never confident: every block runs its whole step budget.
        assert answer.denoising_steps == blocks * config.max_denoising_steps
    assert any(answer.token_ids for answer in answers)


def test_checkpoint_loads_like_the_hf_dir(hf_dir, tmp_path):
    """`--checkpoint` reads our Orbax layout (the converter's import_hf output), with the tokenizer and
    generation config taken from its hf/ side directory."""
    streaming = pytest.importorskip("diffusion_gemma.checkpoints.streaming")
    checkpoint = str(tmp_path / "ckpt")
    streaming.import_hf(hf_dir, checkpoint, progress=False)
    from_checkpoint, from_hf = loading.load(checkpoint=checkpoint), loading.load(hf_dir=hf_dir)
    assert from_checkpoint.sampler_config() == from_hf.sampler_config()
    assert load_tokenizer(from_checkpoint.tokenizer).encode("hello world") == load_tokenizer(hf_dir).encode(
        "hello world")
    tokenizer = load_tokenizer(hf_dir)
    answers = [cli.answer_prompts(loaded.model, tokenizer, PROMPTS, loaded.sampler_config(), chat=True,
                                  batch_size=2)
               for loaded in (from_checkpoint, from_hf)]
    assert [a.token_ids for a in answers[0]] == [a.token_ids for a in answers[1]]


def test_trim_answer_and_overrides():
    config = cli.sampler_lib.SamplerConfig(eos_token_ids=(1, 106), pad_token_id=0)
    assert cli.trim_answer(np.array([7, 0, 8, 106, 9, 1]), config) == [7, 8]
    overrides = cli.sampler_overrides(max_new_tokens=None, strategy="top_k", accept_top_k=4, greedy=True,
                                      fixed_steps=True, entropy_bound=None)
    assert overrides == dict(acceptance="top_k", accept_top_k=4, greedy=True, early_stop=False)
    assert cli.sampler_overrides(strategy="margin", accept_margin=0.5, accept_top_k=None) == dict(
        acceptance="margin", accept_margin=0.5)


def test_step_display(hf_dir, capsys):
    show = cli.print_steps(load_tokenizer(hf_dir))
    show(cli.sampler_lib.StepEvent(block=1, steps_remaining=7, canvas=np.zeros((2, 3), int),
                                   argmax=np.array([[10, 11, 12], [13, 14, 15]]),
                                   accepted=np.array([[True, False, True], [True, True, True]]),
                                   done=np.array([False, True])))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[block 1 step   7 row 0 2 accepted]") and "row 1 done" in lines[1]


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"plain string"\n\n{"prompt": "an object", "id": 3, "template": "a _ b"}\n')
    lines = cli.read_prompts(str(path))
    assert [(line.prompt, line.template) for line in lines] == [("plain string", None), ("an object", "a _ b")]
    assert lines[1].where == f"{path}:3"
    path.write_text('{"text": "wrong field"}\n')
    with pytest.raises(ValueError, match=":1: expected"):
        cli.read_prompts(str(path))
    path.write_text('{"prompt": "p", "template": 3}\n')
    with pytest.raises(ValueError, match=":1: 'template' must be a string"):
        cli.read_prompts(str(path))


# ------------------------------------------------------------------------------------- templates (infilling)
def test_parse_template_gives_one_unknown_token_per_blank(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    clamp = cli.parse_template(tokenizer, "sky_is__blue", blank="_")
    sky, is_, blue = (tokenizer.encode(piece) for piece in ("sky", "is", "blue"))
    assert list(clamp.known) == [True] * len(sky) + [False] + [True] * len(is_) + [False] * 2 + [True] * len(blue)
    assert [i for i, k in zip(clamp.ids, clamp.known) if k] == sky + is_ + blue
    assert cli.parse_template(tokenizer, "a<?>b", blank="<?>").known == (True, False, True)
    for template, message in (("___", "no known text"), ("x" * 20 + "_", "21 tokens long .* max_new_tokens = 16")):
        with pytest.raises(ValueError, match=message):
            cli.parse_template(tokenizer, template, max_new_tokens=16)
    ids, mask = cli.clamp_arrays([clamp, None], 16)
    assert mask[1].sum() == 0 and mask[0].sum() == sum(clamp.known) and ids[0, 0] == sky[0]


def test_answers_follow_their_templates(hf_dir):
    loaded = loading.load(hf_dir=hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    templates = ["blue__ because_", None]
    answers = cli.answer_prompts(loaded.model, tokenizer, PROMPTS, loaded.sampler_config(), chat=True,
                                 batch_size=2, templates=templates)
    blue, because = tokenizer.encode("blue"), tokenizer.encode(" because")
    first = answers[0].token_ids
    # Known tokens first: nothing (no EOS, no pad) can come before them, so they open the answer.
    assert first[: len(blue)] == blue and len(first) >= len(blue) + 2 + len(because)
    assert _is_subsequence(because, first[len(blue):])
    assert answers[0].template == templates[0] and answers[1].template is None
    plain = cli.answer_prompts(loaded.model, tokenizer, PROMPTS, loaded.sampler_config(), chat=True, batch_size=2)
    assert plain[1].token_ids == answers[1].token_ids  # a row without a template is generated as before
    assert plain[0].token_ids[: len(blue)] != blue


def _is_subsequence(part, whole):
    it = iter(whole)
    return all(token in it for token in part)


def test_main_with_a_template(hf_dir, tmp_path, capsys):
    output = tmp_path / "answer.jsonl"
    run_flag_main(cli.main, ["generate", f"--hf_dir={hf_dir}", "--prompt=why is the sky blue", "--chat",
                             "--template=it is+++", "--blank=+", f"--output={output}"])
    record = json.loads(output.read_text())
    known = load_tokenizer(hf_dir).encode("it is")
    assert record["template"] == "it is+++" and record["token_ids"][: len(known)] == known
    assert "tokens per forward" in capsys.readouterr().out


def test_template_mistakes_are_one_line_usage_errors(hf_dir, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "hi", "template": "z" * 30}) + "\n")
    cases = [([f"--prompts_file={prompts_file}", "--template=a_"], "--template goes with --prompt"),
             (["--prompt=hi", "--template=a_", "--blank="], "--blank must not be empty"),
             (["--prompt=hi", "--template=__"], "--template: '__' has no known text"),
             (["--prompt=hi", "--template=" + "y" * 20], "--template: 'y+' is 20 tokens long .* max_new_tokens = 16"),
             ([f"--prompts_file={prompts_file}"], f"{prompts_file}:1: template: 'z+' is 30 tokens long")]
    for flags_given, message in cases:
        with pytest.raises(UsageError, match=message):
            run_flag_main(cli.main, ["generate", f"--hf_dir={hf_dir}", *flags_given])


def test_main_batch_mode_prints_and_writes_answers(hf_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    output = tmp_path / "answers.jsonl"
    argv = ["generate", f"--hf_dir={hf_dir}", f"--prompts_file={prompts_file}", "--chat", "--batch_size=2",
            f"--output={output}"]
    run_flag_main(cli.main, argv)
    printed = capsys.readouterr().out
    assert printed.count("=== prompt") == 2 and printed.count("tokens per forward") == 2
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS and all(r["tokens_per_forward"] > 0 for r in records)


def test_usage_errors_exit_before_loading(hf_dir):
    """Runs the real entry point; a usage error is one line with exit status 2, before JAX loads the model."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "diffusion_gemma.generate", f"--hf_dir={hf_dir}"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "exactly one of --prompt and --prompts_file" in result.stderr
    too_long = subprocess.run([sys.executable, "-m", "diffusion_gemma.generate", f"--hf_dir={hf_dir}", "--prompt=hi",
                               "--template=" + "x" * 20 + "_"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
    lines = too_long.stderr.strip().splitlines()
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr, too_long.stderr
    assert lines[-1].startswith("generate: usage error: --template: ") and "21 tokens long" in lines[-1]
