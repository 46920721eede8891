"""Helpers for tests that run the training CLI in subprocesses (signals, crashes, several processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import jax

from diffusion_gemma.training.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG_FILE = '''"""A TrainConfig written by tests/cli_runs.py."""
import json

from ml_collections import ConfigDict


def get_config():
    return ConfigDict(json.loads({payload!r}))
'''


def write_config_file(config: TrainConfig, path: str) -> str:
    """An ml_collections config file that `--config=` loads back into exactly `config`."""
    with open(path, "w") as f:
        f.write(_CONFIG_FILE.format(payload=json.dumps(dataclasses.asdict(config))))
    return path


# Cuts CPU compilation ~3x (58 s -> 18 s for the multi-process test's step) at the price of bit-exactness with
# the in-process runs (no FMA contraction): for children compared with a tolerance.
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]


def cli_env(num_devices: int, *, fast_compile: bool = False) -> dict[str, str]:
    """The child's JAX setup: `num_devices` CPU devices and the numerics and compile cache of tests/conftest.py,
    so that a child's losses are comparable bit for bit with an in-process run's (unless `fast_compile`).
    (Not `jax_share_binary_between_hosts`: with a persistent cache, process 0 may load a program from the cache
    while process 1, whose cache key differs, waits for process 0 to send it: a hang.)"""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=REPO,
                XLA_FLAGS=" ".join(flags + (FAST_COMPILE_FLAGS if fast_compile else [])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TRAIN_CLI = ("-m", "diffusion_gemma.train")
CRASHING_TRAIN = (os.path.join(REPO, "experiments", "fault_drills", "crashing_train.py"),)


def launch_train(config_file: str, workdir: str, *flags: str, env: dict[str, str], log: str,
                 program: tuple[str, ...] = TRAIN_CLI) -> subprocess.Popen:
    """`python -m diffusion_gemma.train` (or `program`) in the background, stdout and stderr to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *program, f"--config={config_file}", f"--workdir={workdir}", *flags],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], timeout: float, logs: list[str]) -> list[int]:
    """Exit codes; on a timeout every process is killed and the logs' tails are shown."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        raise AssertionError(f"training CLI still running after {timeout} s:\n" + tails(logs)) from None


def tails(logs: list[str], chars: int = 3000) -> str:
    return "\n".join(f"--- {log}:\n{open(log, errors='replace').read()[-chars:]}"
                     for log in logs if os.path.exists(log))


def wait_for(predicate, timeout: float, what: str, processes: list[subprocess.Popen], logs: list[str]) -> None:
    """Poll `predicate` every 20 ms until it holds; fail early if a process has exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in processes):
            raise AssertionError(f"a training process exited before {what}:\n" + tails(logs))
        if time.monotonic() > deadline:
            for p in processes:
                p.kill()
            raise AssertionError(f"timed out waiting for {what}:\n" + tails(logs))
        time.sleep(0.02)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def checkpoint_steps(workdir: str) -> list[int]:
    """Finalised checkpoint steps (Orbax writes into a temporary directory and renames it on commit)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def run_flag_main(main, argv: list[str]):
    """Call an absl CLI's `main` in this process with `argv` parsed into the global flags, leaving them unparsed
    afterwards (the next test starts from the defaults)."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        return main([argv[0]])
    finally:
        flags.FLAGS.unparse_flags()
