"""`python -m diffusion_gemma.train --config=configs/NAME.py[:variant] --workdir=DIR`: fine-tune DiffusionGemma.

A thin CLI: flags (`--config=path.py[:variant]`, `--config.a.b=value` overrides, `--workdir`, multi-host
flags), `jax.distributed` initialisation, version/device/mesh logging, then one library call:
`diffusion_gemma.training.trainer.train(config, workdir)`.

A mistake (a config file or key that does not exist, a bad value, a workdir that cannot be written, a missing
checkpoint or data file) ends the run with one line on stderr: exit 2 for flags and config keys, 1 for a run
that failed; `--verbose` adds the traceback. A run stopped by SIGINT or SIGTERM saves a checkpoint, says so and
exits 130 or 143; the same command resumes it.

A CPU-backend, single-process launch on Linux re-executes itself once with huge-page malloc and says so in
one line on stdout (`host_allocator.py`; `DIFFUSION_GEMMA_HUGE_PAGES=0` turns it off, `=1` asks for it on any
launch).
"""

from __future__ import annotations

import functools
import os
import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from diffusion_gemma import cli, host_allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go "
                               "(default: /tmp/diffusion_gemma/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a manual multi-process "
                                   "launch (TPU slices, SLURM and Open MPI are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a manual launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual launch (0: the one that "
                                   "writes metrics and checkpoint metadata).")

PROG = "train"


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    variant = config_path.split(":")[1] if ":" in config_path else ""
    return os.path.join("/tmp/diffusion_gemma", name + (f"_{variant}" if variant else ""))


def user_errors() -> tuple[type[BaseException], ...]:
    """The library's exceptions that mean "your input is wrong", not "bug" (imported lazily: they pull in JAX,
    which flag and config-key mistakes should not wait for)."""
    from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
    from diffusion_gemma.config import ConfigError
    from diffusion_gemma.data.chat import ChatFormatError
    from diffusion_gemma.data.pipeline import IteratorStateError
    from diffusion_gemma.data.tokenizer import TokenizerError
    from diffusion_gemma.distributed import DistributedSetupError
    from diffusion_gemma.sharding import ShardingError
    from diffusion_gemma.training.checkpointing import IncompatibleCheckpointError
    from diffusion_gemma.training.config import TrainConfigError
    from diffusion_gemma.training.trainer import TrainingError

    return (CheckpointError, ConfigError, ChatFormatError, TokenizerError, DistributedSetupError, ShardingError,
            IncompatibleCheckpointError, IteratorStateError, TrainConfigError, TrainingError, OSError)


def stop_line(result, workdir: str) -> tuple[str, int]:
    """The closing line for a run that a signal stopped early, and its exit status (128 + the signal)."""
    line = (f"stopped at step {result.final_step} of {result.target_step} ({result.stop_reason}), checkpoint "
            f"saved in {os.path.join(workdir, 'checkpoints')}; rerun the same command to resume")
    number = getattr(signal, str(result.stop_reason), None)
    return line, 128 + int(number) if number is not None else cli.EXIT_FAILED


def main(argv, *, may_reexec: bool = False) -> int:
    """The CLI's body. `may_reexec` (the command line's own call, never an in-process one): a CPU-backend,
    single-process launch re-executes itself once with huge-page malloc (`host_allocator`), after the flags and
    the config have been checked and before JAX starts a backend."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    # Checked here rather than with absl's mark_flags_as_required, whose validator would then bind every tool
    # that shares the process's flags (tests, notebooks) to a --config flag it does not have.
    if _CONFIG.value is None:
        raise cli.UsageError("--config=FILE[:variant] is required")
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or default_workdir(config_arg)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise cli.UserError(f"workdir {workdir} is a file, not a directory")
    from diffusion_gemma.training.config import TrainConfigError, from_config_dict

    try:
        config = from_config_dict(_CONFIG.value)
    except TrainConfigError as err:
        raise cli.UsageError(f"--config={config_arg}: {err}") from None
    import jax

    from diffusion_gemma import distributed

    try:
        single_process = distributed.launch_kind(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value) is None
        if may_reexec:
            host_allocator.reexec_with_huge_pages(PROG, single_process=single_process)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except (distributed.DistributedSetupError, host_allocator.HugePagesSwitchError) as err:
        raise cli.UsageError(str(err)) from None
    from diffusion_gemma.training.trainer import train

    logging.info("jax %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.devices())
    if jax.process_index() == 0:
        processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(f"workdir: {workdir}; {jax.device_count()} device(s){processes}: {jax.devices()[0].device_kind}",
              flush=True)
    created = not os.path.exists(workdir)
    try:
        result = train(config, workdir)
    except user_errors() as err:
        if created:  # a run that failed before writing anything leaves no empty workdir behind
            try:
                os.rmdir(workdir)
            except OSError:
                pass
        raise cli.UserError(cli.message_of(err)) from err
    if result.stop_reason is not None:
        line, status = stop_line(result, workdir)
        if jax.process_index() == 0:
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)
        return status
    last = result.history[-1] if result.history else {}
    if jax.process_index() == 0:
        print(f"done: step {result.final_step}; loss {last.get('loss', float('nan')):.4f}; checkpoints in "
              f"{os.path.join(workdir, 'checkpoints')}; metrics in {os.path.join(workdir, 'metrics.jsonl')}")
    return 0


if __name__ == "__main__":
    cli.run_absl(PROG, functools.partial(main, may_reexec=True))
