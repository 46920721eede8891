"""Fault drills on the training CLI, in subprocesses: SIGTERM (preemption), SIGKILL in the middle of a
checkpoint save, and a disk too small for a checkpoint. The reference is the uninterrupted in-process run of
tests/test_training.py's tiny config; the CLI children run the same compiled step (same devices, numerics and
compile cache), so their losses must match it exactly."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from cli_runs import (CRASHING_TRAIN, REPO, checkpoint_steps, cli_env, launch_train, read_metrics, tails, wait_all,
                      wait_for, write_config_file)
from test_training import tiny_config, uninterrupted  # noqa: F401  (the fixture: 8 uninterrupted steps)
from diffusion_gemma.training.config import CheckpointSection
from diffusion_gemma.training.trainer import train

slow = pytest.mark.slow  # see tests/conftest.py


def _crashing_train():
    spec = importlib.util.spec_from_file_location("crashing_train", CRASHING_TRAIN[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_commit_hook_matches_only_the_rename_of_the_steps_temporary_directory():
    is_commit = _crashing_train().is_commit
    root = os.path.join("/work", "checkpoints")
    tmp = os.path.join(root, "8.orbax-checkpoint-tmp-1712")
    assert is_commit("os.rename", (tmp, os.path.join(root, "8"), -1, -1), 8) == "8.orbax-checkpoint-tmp-1712"
    assert is_commit("os.rename", (tmp.encode(), os.path.join(root, "8/").encode(), -1, -1), 8) == \
        "8.orbax-checkpoint-tmp-1712"
    assert is_commit("os.rename", (tmp, os.path.join(root, "8"), -1, -1), 4) is None  # another step
    assert is_commit("os.rename", (os.path.join(root, "80.tmp"), os.path.join(root, "80"), -1, -1), 8) is None
    assert is_commit("os.rename", (tmp, os.path.join("/elsewhere", "8"), -1, -1), 8) is None
    assert is_commit("os.rename", (os.path.join(root, ".hf.tmp"), os.path.join(root, "hf"), -1, -1), 8) is None
    assert is_commit("open", (tmp, "r", 0), 8) is None


@slow
def test_sigterm_saves_the_step_reached_exits_143_and_the_resume_continues_exactly(uninterrupted, tmp_path):
    _, full = uninterrupted
    # Only the SIGTERM checkpoint: the periodic ones are out of reach (the compiled step is unchanged).
    config = tiny_config(checkpoint=CheckpointSection(every_steps=1000, keep=3, async_save=True))
    workdir, log = str(tmp_path / "work"), str(tmp_path / "train.log")
    child = launch_train(write_config_file(config, str(tmp_path / "config.py")), workdir, env=cli_env(8), log=log)
    wait_for(lambda: read_metrics(workdir), 600, "the first step", [child], [log])
    child.send_signal(signal.SIGTERM)
    assert wait_all([child], 300, [log]) == [128 + signal.SIGTERM], tails([log])
    before = read_metrics(workdir)
    reached = before[-1]["step"]
    assert reached < config.num_steps, "the run finished before SIGTERM arrived; nothing was tested"
    assert [record["step"] for record in before] == list(range(1, reached + 1))
    assert checkpoint_steps(workdir) == [reached]
    assert f"stopped at step {reached} of {config.num_steps} (SIGTERM), checkpoint saved in" in open(log).read()

    resumed = train(config, workdir, progress=False)
    assert resumed.steps_run == config.num_steps - reached
    np.testing.assert_array_equal([record["loss"] for record in before] + resumed.losses, full.losses)


@slow
def test_sigkill_while_a_checkpoint_commits_resumes_from_the_previous_one_losing_nothing(uninterrupted, tmp_path):
    _, full = uninterrupted
    config = tiny_config()  # synchronous checkpoints at steps 4 and 8
    workdir, log = str(tmp_path / "work"), str(tmp_path / "train.log")
    child = launch_train(write_config_file(config, str(tmp_path / "config.py")), workdir, "--kill_at_step=8",
                         "--kill_point=commit", env=cli_env(8), log=log, program=CRASHING_TRAIN)
    assert wait_all([child], 600, [log]) == [-signal.SIGKILL], tails([log])
    assert "SIGKILL in process 0 before committing checkpoint 8" in open(log).read()
    directory = os.path.join(workdir, "checkpoints")
    assert checkpoint_steps(workdir) == [4]
    assert [name for name in os.listdir(directory) if name.startswith("8.")], "no partial checkpoint 8 on disk"
    crashed = [record["loss"] for record in read_metrics(workdir)]
    np.testing.assert_array_equal(crashed, full.losses)  # all 8 steps ran; only the last save was lost

    resumed = train(config, workdir, progress=False)
    assert resumed.steps_run == 4 and checkpoint_steps(workdir) == [4, 8]
    np.testing.assert_array_equal(resumed.losses, full.losses[4:])
    # The crashed run's lines for steps 5-8 gave way to the resumed run's: one line per step.
    assert [record["step"] for record in read_metrics(workdir)] == list(range(1, 9))


def _user_namespaces_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@slow
@pytest.mark.skipif(not _user_namespaces_work(), reason="needs `unshare --user --map-root-user --mount` (user "
                    "namespaces) to mount a small tmpfs without privileges")
def test_a_disk_too_small_for_a_checkpoint_is_refused_before_training(tmp_path):
    small = tmp_path / "small_disk"
    small.mkdir()
    config_file = write_config_file(tiny_config(), str(tmp_path / "config.py"))
    # A real 1 MiB filesystem (tmpfs in a private mount namespace); one checkpoint needs ~2.6 MB by the estimate.
    script = (f"mount -t tmpfs -o size=1m tmpfs {small} && cd {REPO} && {sys.executable} -m diffusion_gemma.train "
              f"--config={config_file} --workdir={small}; code=$?; echo LEFT: $(ls -A {small} "
              f"{small}/checkpoints); exit $code")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            env=cli_env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]  # one line, no traceback
    assert line.startswith(f"train: error: {small}/checkpoints: ")
    assert "MB free on its disk, one checkpoint needs about" in line
    left = result.stdout.split("LEFT:")[1].split()
    assert not [name for name in left if name.isdigit() or name == "metrics.jsonl"], left  # nothing trained
