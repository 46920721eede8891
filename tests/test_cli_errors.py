"""A user's mistake in `train`, `generate` or `convert` ends in one line on stderr that names the file, key or
flag (with the nearest valid key for a typo), exit 2 for usage and 1 for a failed run, no traceback, no flag
help, and nothing written. Every case runs the real entry point in a subprocess; none compiles anything."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import pytest

from diffusion_gemma import cli
from diffusion_gemma import train as train_cli
from diffusion_gemma.training.config import TrainConfig

from cli_runs import REPO, cli_env, write_config_file

pytestmark = pytest.mark.slow  # see tests/conftest.py


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(env or cli_env(1))
    env.pop(cli.VERBOSE_ENV, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def one_line(result: subprocess.CompletedProcess, exit_code: int, *fragments: str) -> str:
    """The single non-empty stderr line, after checking the exit code and that no traceback or help came out."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "--helpfull" not in result.stderr + result.stdout and "flags:" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config_file(tmp_path):
    """A small TrainConfig as a config file (loads without JAX, so flag errors come back fast)."""
    return write_config_file(TrainConfig(num_steps=2), str(tmp_path / "small_config.py"))


# --------------------------------------------------------------------------------------- train: usage (exit 2)
def test_misspelled_config_path_suggests_the_file(tmp_path):
    workdir = tmp_path / "run"
    result = run("diffusion_gemma.train", "--config=configs/sudok.py", f"--workdir={workdir}")
    line = one_line(result, 2, "configs/sudok.py", "did you mean configs/sudoku.py?")
    assert line.startswith("train: usage error:") and not result.stdout and not workdir.exists()
    result = run("diffusion_gemma.train", f"--workdir={workdir}")
    one_line(result, 2, "--config=FILE[:variant] is required")
    assert not workdir.exists()


@pytest.mark.parametrize("override, expected", [
    ("lerning_rate", "unknown config key 'lerning_rate' (did you mean optimizer.learning_rate?)"),
    ("optimiser.learning_rate", "unknown config key 'optimiser.learning_rate' (did you mean "
                                "optimizer.learning_rate?)"),
    ("data.global_batchsize", "(did you mean data.global_batch_size?)"),
])
def test_typo_in_a_config_key_names_the_nearest_key(config_file, tmp_path, override, expected):
    workdir = tmp_path / "run"
    result = run("diffusion_gemma.train", f"--config={config_file}", f"--config.{override}=1", f"--workdir={workdir}")
    one_line(result, 2, expected)
    assert not workdir.exists()


def test_unknown_variant_and_bad_value(tmp_path, config_file):
    workdir = tmp_path / "run"
    result = run("diffusion_gemma.train", "--config=configs/sudoku.py:gpux", f"--workdir={workdir}")
    one_line(result, 2, "configs/sudoku.py:gpux", "unknown variant 'gpux'")
    result = run("diffusion_gemma.train", f"--config={config_file}", "--config.num_steps=abc", f"--workdir={workdir}")
    one_line(result, 2, "--config.num_steps=abc")
    result = run("diffusion_gemma.train", f"--config={config_file}", f"--workdr={workdir}")
    one_line(result, 2, "'workdr'", "workdir")
    assert not workdir.exists()


def test_invalid_config_value_names_the_key(config_file, tmp_path):
    """Checked when the ConfigDict becomes a TrainConfig: still before any workdir or JAX computation."""
    workdir = tmp_path / "run"
    result = run("diffusion_gemma.train", f"--config={config_file}", "--config.model.remat=fulll",
                 f"--workdir={workdir}")
    one_line(result, 2, "model.remat", "'fulll'")
    assert not result.stdout and not workdir.exists()


# ---------------------------------------------------------------------------------- train: failed run (exit 1)
def test_workdir_that_is_a_file(config_file, tmp_path):
    workdir = tmp_path / "a_file"
    workdir.write_text("keep me")
    one_line(run("diffusion_gemma.train", f"--config={config_file}", f"--workdir={workdir}"), 1, str(workdir),
             "not a directory")
    assert workdir.read_text() == "keep me"


def test_missing_checkpoint_and_data_file_leave_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    missing = str(tmp_path / "nope")
    base = TrainConfig(num_steps=2)
    overridable = dataclasses.replace(base, model=dataclasses.replace(base.model, init_checkpoint=""))  # not None
    config = write_config_file(overridable, str(tmp_path / "config.py"))
    result = run("diffusion_gemma.train", f"--config={config}", f"--config.model.init_checkpoint={missing}",
                 f"--workdir={workdir}")
    one_line(result, 1, f"{missing}: no such checkpoint directory")
    assert not workdir.exists()

    chat = dataclasses.replace(base, data=dataclasses.replace(
        base.data, source="chat_jsonl", path=missing + ".jsonl",
        tokenizer=os.path.join(REPO, "configs", "data", "tiny_tokenizer.json")))
    config = write_config_file(chat, str(tmp_path / "chat_config.py"))
    result = run("diffusion_gemma.train", f"--config={config}", f"--workdir={workdir}")
    one_line(result, 1, f"{missing}.jsonl: No such file or directory")
    assert not workdir.exists()


def test_verbose_shows_the_traceback(config_file, tmp_path):
    result = run("diffusion_gemma.train", f"--config={config_file}", "--config.lerning_rate=1", "--verbose",
                 f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train: usage error: unknown config key 'lerning_rate'")


def test_stop_line_names_step_and_signal():
    """A run stopped by a signal: where it stopped, where the checkpoint is, and 128 + the signal number."""
    stopped = type("Result", (), dict(final_step=7, target_step=20, stop_reason="SIGINT"))
    line, status = train_cli.stop_line(stopped, "/w")
    assert line == ("stopped at step 7 of 20 (SIGINT), checkpoint saved in /w/checkpoints; rerun the same "
                    "command to resume")
    assert status == 130 == 128 + signal.SIGINT
    stopped.stop_reason = "SIGTERM"
    assert train_cli.stop_line(stopped, "/w")[1] == 143


# ----------------------------------------------------------------------------------------- generate, convert
def test_generate_mistakes(tmp_path):
    output = tmp_path / "answers.jsonl"
    result = run("diffusion_gemma.generate", "--checkpoint=/nope", f"--output={output}")
    one_line(result, 2, "--prompt")
    result = run("diffusion_gemma.generate", f"--checkpoint={tmp_path / 'nope'}", "--prompt=hi", f"--output={output}")
    one_line(result, 1, f"{tmp_path / 'nope'}: no such checkpoint directory")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"fine"\n{"prompt": "unclosed"\n')
    result = run("diffusion_gemma.generate", f"--checkpoint={tmp_path / 'nope'}", f"--prompts_file={prompts}",
                 f"--output={output}")
    one_line(result, 1, f"{prompts}:2:", "invalid JSON")
    assert not output.exists()
    output.write_text("the user's earlier answers\n")  # refused before the model loads, and left as it was
    result = run("diffusion_gemma.generate", f"--checkpoint={tmp_path / 'nope'}", "--prompt=hi", f"--output={output}")
    one_line(result, 1, f"{output} already exists; pass --overwrite")
    assert output.read_text() == "the user's earlier answers\n"


def test_convert_mistakes(tmp_path):
    output = tmp_path / "out"
    result = run("diffusion_gemma.convert", "export-hf", f"--checkpoint={tmp_path / 'nope'}", f"--output={output}")
    one_line(result, 1, f"{tmp_path / 'nope'}: no such checkpoint directory")
    result = run("diffusion_gemma.convert", "export-hff", f"--checkpoint={tmp_path}", f"--output={output}")
    one_line(result, 2, "did you mean export-hf?")
    assert not output.exists()


# ------------------------------------------------------------------------------------------- the hint itself
def test_nearest_key_prefers_the_leaf_name():
    keys = cli.config_keys({"seed": 0, "optimizer": {"learning_rate": 1.0, "end_learning_rate": 0.1},
                            "evaluation": {"seed": 1, "num_examples": 8}, "data": {"num_synthetic_examples": 4}})
    assert "optimizer" in keys and "optimizer.end_learning_rate" in keys
    assert cli.nearest_key("lerning_rate", keys) == "optimizer.learning_rate"
    assert cli.nearest_key("evaluation.num_exmples", keys) == "evaluation.num_examples"
    assert cli.nearest_key("end_learning_rte", keys) == "optimizer.end_learning_rate"
    assert cli.nearest_key("zzz", keys) is None
