"""Interrupts are safe and visible: Ctrl-C stops like SIGTERM (checkpoint at the step reached, a "stopped at
step N of M" line, exit 130) and the same command resumes exactly; a second Ctrl-C aborts at once; SIGTERM in
the middle of a periodic evaluation abandons it within a few denoising steps; checkpoints also follow the clock;
metrics.jsonl keeps one line per step across a resume."""

import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from cli_runs import checkpoint_steps, cli_env, launch_train, read_metrics, tails, wait_all, wait_for, write_config_file
from test_sudoku_eval import TINY_SUDOKU, load_sudoku_config
from test_training import TINY_MODEL, tiny_config, uninterrupted  # noqa: F401  (the fixture: 8 uninterrupted steps)
from diffusion_gemma import distributed
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.sampling.sampler import SamplerConfig, generate
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.training import evaluation
from diffusion_gemma.training.config import CheckpointSection, TrainConfigError, from_config_dict
from diffusion_gemma.training.metrics import drop_lines_after
from diffusion_gemma.training.loop import SaveSchedule
from diffusion_gemma.training.trainer import train

pytestmark = pytest.mark.slow  # see tests/conftest.py

main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="Python delivers signals to the main thread only")


def test_ctrl_c_saves_the_step_reached_and_the_same_command_resumes_exactly(uninterrupted, tmp_path):
    _, full = uninterrupted
    # Only the stop's checkpoint: the periodic ones (steps or clock) are out of reach of a few steps.
    config = tiny_config(checkpoint=CheckpointSection(every_steps=1000, keep=3, async_save=True))
    config_file = write_config_file(config, str(tmp_path / "config.py"))
    workdir, logs = str(tmp_path / "work"), [str(tmp_path / "run1.log"), str(tmp_path / "run2.log")]
    child = launch_train(config_file, workdir, env=cli_env(8), log=logs[0])
    wait_for(lambda: read_metrics(workdir), 600, "the first step", [child], logs)
    child.send_signal(signal.SIGINT)
    assert wait_all([child], 300, logs) == [130], tails(logs)
    stopped = read_metrics(workdir)
    reached = stopped[-1]["step"]
    assert reached < config.num_steps, "the run finished before Ctrl-C arrived; nothing was tested"
    assert [record["step"] for record in stopped] == list(range(1, reached + 1))
    assert checkpoint_steps(workdir) == [reached]
    said = open(logs[0]).read()
    assert "compiling the train step ...\ntrain step compiled in " in said
    assert f"SIGINT: stopping at step {reached} of {config.num_steps}, saving a checkpoint" in said
    assert (f"stopped at step {reached} of {config.num_steps} (SIGINT), checkpoint saved in "
            f"{os.path.join(workdir, 'checkpoints')}; rerun the same command to resume") in said
    assert "Traceback" not in said

    child = launch_train(config_file, workdir, env=cli_env(8), log=logs[1])
    assert wait_all([child], 600, logs) == [0], tails(logs)
    assert f"resuming from step {reached} of {config.num_steps} ({os.path.join(workdir, 'checkpoints')})" in (
        open(logs[1]).read())
    records = read_metrics(workdir)
    assert [record["step"] for record in records] == list(range(1, config.num_steps + 1))
    np.testing.assert_array_equal([record["loss"] for record in records], full.losses)


@main_thread_only
def test_the_first_ctrl_c_asks_for_a_stop_the_second_aborts():
    # Python's own Ctrl-C handler, as a user's process has it (a test worker may inherit another one).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with distributed.StopSignal() as stop:
            assert not stop.check()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.check() and stop.reason == "SIGINT"
            # the second Ctrl-C meets the usual handler
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)  # the handler runs here at the latest
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@main_thread_only
def test_sigterm_during_an_evaluation_abandons_it_within_a_few_denoising_steps(tmp_path, monkeypatch):
    raw = load_sudoku_config("")
    raw.num_steps, raw.log_every = 4, 1
    raw.model.overrides = dict(TINY_SUDOKU)
    raw.data.update(global_batch_size=4, num_synthetic_examples=64)
    # The clock's interval shrunk to nothing: a time-based checkpoint after every step (step 1's shows it).
    raw.checkpoint.update(every_steps=1000, every_minutes=1e-9, async_save=False)
    # An untrained model is never confident: 8 batches x 64 denoising steps would run.
    raw.evaluation.update(every_steps=2, num_examples=32, batch_size=4, max_denoising_steps=64)
    config = from_config_dict(raw)
    asked, signalled = [], []
    make_evaluator = evaluation.make_evaluator

    def signalling_evaluator(*args):
        evaluate = make_evaluator(*args)

        def run(model, step, should_stop):
            def ask():  # called after every denoising step, block and batch
                asked.append(time.monotonic())
                if len(asked) == 10:  # in the first batch's denoising loop, compiled and running
                    signalled.append(len(asked))
                    os.kill(os.getpid(), signal.SIGTERM)
                return should_stop()
            return evaluate(model, step, ask)
        return run

    monkeypatch.setattr(evaluation, "make_evaluator", signalling_evaluator)
    workdir = str(tmp_path)
    result = train(config, workdir, progress=False, devices=jax.devices()[:1])
    returned = time.monotonic()
    assert (result.stop_reason, result.final_step, result.target_step) == ("SIGTERM", 2, 4)
    assert signalled == [10]
    late = len(asked) - signalled[0]
    print(f"asked {late} more time(s) after the signal; returned {returned - asked[9]:.2f} s after it")
    assert late <= 16, f"the sampler ran {late} more steps (of the batch's 64)"
    assert returned - asked[9] < 30  # the checkpoint, not the 8 x 64 evaluation steps
    assert checkpoint_steps(workdir) == [1, 2]
    records = read_metrics(workdir)
    assert [record["step"] for record in records] == [1, 2]
    assert not [key for record in records for key in record if key.startswith("eval/")]
    assert not [key for entry in result.history for key in entry if key.startswith("eval/")]


def test_the_sampler_gives_up_within_a_step_when_asked():
    model = DiffusionGemma(ModelConfig.tiny(**TINY_MODEL), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(1, 64, (2, 12))
    config = SamplerConfig(max_new_tokens=16, max_denoising_steps=8, early_stop=False)

    class StopAfter:
        def __init__(self):
            self.answers, self.limit = 0, None

        def __call__(self) -> bool:
            self.answers += 1
            return self.limit is not None and self.answers > self.limit

    ask = StopAfter()
    plain = generate(model, ids, None, jax.random.key(1), config)
    asked = generate(model, ids, None, jax.random.key(1), config, should_stop=ask)
    np.testing.assert_array_equal(asked.tokens, plain.tokens)  # never stopping changes nothing
    assert ask.answers == 2 * 8 + 2  # every step of both blocks, and after each block
    ask.answers, ask.limit = 0, 3
    stopped = generate(model, ids, None, jax.random.key(1), config, should_stop=ask)
    assert np.asarray(stopped.steps_per_block).tolist() == [4, 0] and int(stopped.num_blocks) == 1


def test_checkpoints_follow_the_clock_of_process_0():
    now, agreed = [0.0], []

    def agree(value: bool) -> bool:  # what every process would get: process 0's value
        agreed.append(value)
        return value

    saves = SaveSchedule(CheckpointSection(every_steps=100, every_minutes=10), clock=lambda: now[0], agree=agree)
    now[0] = 599.0
    assert not saves.due(1)
    now[0] = 600.0
    assert saves.due(2)
    saves.saved()
    now[0] = 1199.0
    assert not saves.due(3) and saves.due(100)  # the step interval still holds
    now[0] = 1200.0
    assert saves.due(101)
    assert agreed == [False, True, False, False, True]  # asked at every step, also when the steps decide

    process_0_says_no = SaveSchedule(CheckpointSection(every_steps=100, every_minutes=10), clock=lambda: now[0],
                                     agree=lambda value: False)
    now[0] = 1e6
    assert not process_0_says_no.due(1) and process_0_says_no.due(200)

    def never(value):
        raise AssertionError("no agreement needed without a clock")

    clockless = SaveSchedule(CheckpointSection(every_steps=3, every_minutes=0), clock=lambda: now[0], agree=never)
    assert [clockless.due(step) for step in range(1, 7)] == [False, False, True, False, False, True]
    assert CheckpointSection().every_minutes == 10.0
    with pytest.raises(TrainConfigError, match="checkpoint.every_minutes must be >= 0"):
        from_config_dict({"checkpoint": {"every_minutes": -1}})


def test_a_resume_drops_the_metrics_logged_after_its_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 7)]
    with open(path, "w") as f:
        f.writelines(lines[:3] + ['{"step": "x"}\n'] + lines[3:] + ['{"step": 7, "lo'])  # killed mid-write
    assert drop_lines_after(path, 4) == 4
    assert open(path).readlines() == lines[:4]
    assert drop_lines_after(path, 4) == 0 and drop_lines_after(str(tmp_path / "none.jsonl"), 0) == 0
    assert drop_lines_after(path, 0) == 4 and open(path).read() == ""
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def test_a_stopped_samples_evaluation_returns_nothing_and_writes_nothing(tmp_path):
    from diffusion_gemma.data.pipeline import DataConfig
    from diffusion_gemma.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            "configs", "data", "tiny_tokenizer.json"))
    model = DiffusionGemma(ModelConfig.tiny(**{**TINY_MODEL, "vocab_size": 512}), rngs=nnx.Rngs(0))
    config = evaluation.EvaluationConfig(every_steps=1, kind="samples", prompts=("What is 2+3?",),
                                         max_denoising_steps=4)
    evaluate = evaluation.make_evaluator(config, DataConfig(), tokenizer, str(tmp_path))
    stop = {"now": False}

    def should_stop() -> bool:
        return stop["now"]

    assert evaluate(model, 1, should_stop)["mean_forwards"] > 0
    samples = tmp_path / evaluation.SAMPLES_FILE
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [1]
    stop["now"] = True
    assert evaluate(model, 2, should_stop) is None
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [1]
