"""Fault drills too slow for CI, run by hand on CPU; results are recorded in README.md next to this file.

    python experiments/fault_drills/drills.py sigterm_one_of_two_processes
    python experiments/fault_drills/drills.py ctrl_c_one_of_two_processes
    python experiments/fault_drills/drills.py sigkill_during_write
    python experiments/fault_drills/drills.py disk_fills_mid_run

Each drill trains the tiny config of tests/test_training.py through the real CLI in subprocesses (helpers from
tests/cli_runs.py), breaks it, resumes, and compares the losses with an uninterrupted in-process run; it prints
what happened and exits non-zero if an expectation fails. The drills in CI are tests/test_fault_drills.py and
tests/test_multihost.py.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
import conftest  # noqa: E402,F401  (8 CPU devices, the tests' numerics and compile cache)
import numpy as np  # noqa: E402

from cli_runs import (CRASHING_TRAIN, checkpoint_steps, cli_env, free_port, launch_train, read_metrics,  # noqa: E402
                      wait_all, wait_for, write_config_file)
from test_multihost import two_process_config  # noqa: E402
from test_training import tiny_config  # noqa: E402
from diffusion_gemma.training.config import CheckpointSection  # noqa: E402
from diffusion_gemma.training.trainer import train  # noqa: E402


def report(name: str, **facts) -> None:
    print(f"== {name}")
    for key, value in facts.items():
        print(f"   {key}: {value}")


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"drill failed: {what}")


def sigterm_one_of_two_processes(root: str) -> None:
    """SIGTERM to process 1 only (a preemption notice reaching one host): both processes must stop after the
    same step, save one checkpoint together (the only one: periodic saves are out of reach), exit 143 (128 +
    SIGTERM); a relaunch finishes like an uninterrupted run."""
    _stop_one_of_two_processes(root, signal.SIGTERM, expected_codes=[143, 143])


def ctrl_c_one_of_two_processes(root: str) -> None:
    """Ctrl-C (SIGINT) to process 1 only: it hands the stop to JAX's preemption service as a SIGTERM to itself,
    so both stop after the same step and save together, as above. Process 1 exits 130 (128 + SIGINT); process
    0, told by the service, cannot know which signal it was and exits 143."""
    _stop_one_of_two_processes(root, signal.SIGINT, expected_codes=[143, 130])


def _stop_one_of_two_processes(root: str, signum: int, expected_codes: list[int]) -> None:
    config = dataclasses.replace(two_process_config(), checkpoint=CheckpointSection(every_steps=1000, keep=3))
    reference = train(config, os.path.join(root, "reference"), progress=False)
    config_file = write_config_file(config, os.path.join(root, "config.py"))
    workdir = os.path.join(root, "work")

    def launch(run: int):
        port = free_port()
        logs = [os.path.join(root, f"run{run}_process{i}.log") for i in range(2)]
        return [launch_train(config_file, workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}", env=cli_env(4, fast_compile=True), log=logs[i])
                for i in range(2)], logs

    processes, logs = launch(1)
    wait_for(lambda: read_metrics(workdir), 900, "the first step", processes, logs)
    signalled_after = read_metrics(workdir)[-1]["step"]
    processes[1].send_signal(signum)
    codes = wait_all(processes, 600, logs)
    stopped = read_metrics(workdir)
    report(f"after {signal.Signals(signum).name} to process 1", signalled_after_step=signalled_after,
           exit_codes=codes, steps_logged=[r["step"] for r in stopped], checkpoints=checkpoint_steps(workdir),
           process0_said=[line for line in open(logs[0]).read().splitlines() if "stopped at step" in line])
    expect(codes == expected_codes, f"exit codes {expected_codes}")
    expect(checkpoint_steps(workdir)[-1] == stopped[-1]["step"] < config.num_steps, "a checkpoint at the stop step")
    processes, logs = launch(2)
    codes = wait_all(processes, 900, logs)
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir)}
    two = np.array([losses[s] for s in range(1, config.num_steps + 1)])
    worst = float(np.max(np.abs(two - np.array(reference.losses)) / np.array(reference.losses)))
    report("after the relaunch", exit_codes=codes, checkpoints=checkpoint_steps(workdir),
           max_relative_loss_difference_to_one_process=f"{worst:.1e}")
    expect(codes == [0, 0] and worst < 1e-5, "the relaunch finishes and matches one process")


def sigkill_during_write(root: str) -> None:
    """SIGKILL right after the trainer hands checkpoint 8 to Orbax (its asynchronous write under way)."""
    config = tiny_config(checkpoint=CheckpointSection(every_steps=4, keep=5, async_save=True))
    reference = train(config, os.path.join(root, "reference"), progress=False)
    workdir, log = os.path.join(root, "work"), os.path.join(root, "train.log")
    child = launch_train(write_config_file(config, os.path.join(root, "config.py")), workdir, "--kill_at_step=8",
                         "--kill_point=write", env=cli_env(8), log=log, program=CRASHING_TRAIN)
    codes = wait_all([child], 900, [log])
    directory = os.path.join(workdir, "checkpoints")
    report("after SIGKILL", exit_code=codes[0], checkpoints=checkpoint_steps(workdir),
           step_directories=sorted(n for n in os.listdir(directory) if n[0].isdigit()))
    expect(codes == [-signal.SIGKILL] and checkpoint_steps(workdir) == [4], "killed with only checkpoint 4 complete")
    resumed = train(config, workdir, progress=False)
    report("after resuming", steps_run=resumed.steps_run, checkpoints=checkpoint_steps(workdir),
           losses_equal_uninterrupted=resumed.losses == reference.losses[4:])
    expect(resumed.losses == reference.losses[4:], "resumed losses equal the uninterrupted run's")


def disk_fills_mid_run(root: str) -> None:
    """A 4 MiB filesystem: the start-up check passes (one checkpoint fits), the second or third save runs out
    of space. Needs `unshare --user --map-root-user --mount` to mount a tmpfs without privileges."""
    config = tiny_config(num_steps=8, checkpoint=CheckpointSection(every_steps=2, keep=5, async_save=False))
    reference = train(config, os.path.join(root, "reference"), progress=False)
    config_file = write_config_file(config, os.path.join(root, "config.py"))
    small, saved = os.path.join(root, "small_disk"), os.path.join(root, "copied_out")
    os.makedirs(small)
    script = (f"mount -t tmpfs -o size=4m tmpfs {small} && cd {REPO} && {sys.executable} -m diffusion_gemma.train "
              f"--config={config_file} --workdir={small}; code=$?; df -k {small} | tail -1; "
              f"cp -a {small} {saved}; exit $code")
    started = time.perf_counter()
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            env=cli_env(8), capture_output=True, text=True, timeout=1800)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "No space" in line]
    report("on the full disk", exit_code=result.returncode, seconds=round(time.perf_counter() - started),
           last_error_lines=errors[-3:], df=result.stdout.strip().splitlines()[-1:],
           complete_checkpoints=checkpoint_steps(saved), steps_logged=[r["step"] for r in read_metrics(saved)])
    expect(result.returncode != 0, "the run fails")
    last = (checkpoint_steps(saved) or [0])[-1]
    resumed = train(config, saved, progress=False)
    report("after resuming on a disk with room", resumed_from=last, steps_run=resumed.steps_run,
           losses_equal_uninterrupted=resumed.losses == reference.losses[last:])
    expect(resumed.losses == reference.losses[last:], "resumed losses equal the uninterrupted run's")


DRILLS = {f.__name__: f for f in (sigterm_one_of_two_processes, ctrl_c_one_of_two_processes, sigkill_during_write,
                                  disk_fills_mid_run)}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in DRILLS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(DRILLS)}}}")
    with tempfile.TemporaryDirectory(prefix=f"drill_{sys.argv[1]}_") as root:
        began = time.perf_counter()
        DRILLS[sys.argv[1]](root)
        print(f"drill {sys.argv[1]} passed in {time.perf_counter() - began:.0f} s")
