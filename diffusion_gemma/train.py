"""`python -m diffusion_gemma.train --config=configs/sudoku.py --workdir=DIR`: fine-tune DiffusionGemma.

A thin CLI: flags (`--config=path.py[:variant]`, `--config.a.b=value` overrides, `--workdir`, multi-host
flags), `jax.distributed` initialisation, version/device/mesh logging, then one library call:
`diffusion_gemma.training.trainer.train(config, workdir)`.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_gemma import distributed, host_allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go "
                               "(default: /tmp/diffusion_gemma/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a manual multi-process "
                                   "launch (TPU slices, SLURM and Open MPI are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a manual launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual launch (0: the one that "
                                   "writes metrics and checkpoint metadata).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    variant = config_path.split(":")[1] if ":" in config_path else ""
    return os.path.join("/tmp/diffusion_gemma", name + (f"_{variant}" if variant else ""))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO; pass --verbosity=0 to see it
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except distributed.DistributedSetupError as err:
        raise app.UsageError(str(err)) from None
    from diffusion_gemma.training.config import from_config_dict
    from diffusion_gemma.training.trainer import train

    config = from_config_dict(_CONFIG.value)
    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "config")
    workdir = _WORKDIR.value or default_workdir(config_arg)
    logging.info("jax %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.devices())
    if jax.process_index() == 0:
        processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(f"workdir: {workdir}; {jax.device_count()} device(s){processes}: {jax.devices()[0].device_kind}",
              flush=True)
    result = train(config, workdir)
    last = result.history[-1] if result.history else {}
    if jax.process_index() == 0:
        print(f"done: step {result.final_step}; loss {last.get('loss', float('nan')):.4f}; checkpoints in "
              f"{os.path.join(workdir, 'checkpoints')}; metrics in {os.path.join(workdir, 'metrics.jsonl')}")


if __name__ == "__main__":
    host_allocator.reexec_with_huge_pages("diffusion_gemma.train")  # CPU steps ~1/3 faster; see the module
    app.run(main)
