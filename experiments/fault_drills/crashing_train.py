"""`python -m diffusion_gemma.train` that SIGKILLs itself in the middle of saving one checkpoint.

    python experiments/fault_drills/crashing_train.py --kill_at_step=4 --kill_point=commit \\
        --config=CONFIG --workdir=DIR [any other flag of diffusion_gemma.train]

Kill points, both inside the save of step `--kill_at_step`:
  write   right after the trainer hands the checkpoint to Orbax (our `TrainCheckpointer.save` returns): the
          asynchronous write is under way.
  commit  every file of the checkpoint is written and the process is about to rename its temporary directory
          to the step's name (the commit of a checkpoint on a local filesystem). The most data on disk without
          a complete checkpoint.
The commit is caught with a Python audit hook (`sys.addaudithook`, event `os.rename`): it sees the rename of a
directory to the step's name before the rename happens, whichever code issues it, and replaces nothing in
Orbax. With several processes only process 0 commits, so `commit` kills process 0 (the others then wait for it).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from absl import app, flags

from diffusion_gemma import train as train_cli
from diffusion_gemma.training import checkpointing

# Not `required=True`: that validator would bind every importer of this module (tests) to the flag.
_STEP = flags.DEFINE_integer("kill_at_step", None, "Step whose checkpoint save is interrupted (required).")
_POINT = flags.DEFINE_enum("kill_point", "commit", ["write", "commit"], "Where in the save to die (see above).")


def _die(where: str) -> None:
    print(f"crashing_train: SIGKILL in process {jax.process_index()} {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def is_commit(event: str, args: tuple, step: int) -> str | None:
    """The temporary directory's name if the audit event renames a sibling directory `<step>.*` to `<step>`
    (the commit of checkpoint `step`), else None."""
    if event != "os.rename":
        return None
    source, destination = (os.fsdecode(os.fspath(path)) for path in args[:2])
    source_dir, source_name = os.path.split(os.path.normpath(source))
    destination_dir, destination_name = os.path.split(os.path.normpath(destination))
    if destination_name == str(step) and source_name.startswith(f"{step}.") and source_dir == destination_dir:
        return source_name
    return None


def install(step: int, point: str) -> None:
    if point == "write":
        original_save = checkpointing.TrainCheckpointer.save

        def save(self, at_step, **kwargs):
            saved = original_save(self, at_step, **kwargs)
            if at_step == step:
                _die(f"while checkpoint {at_step} is being written")
            return saved

        checkpointing.TrainCheckpointer.save = save
    else:
        def audit(event, args):
            temporary = is_commit(event, args, step)
            if temporary is not None:
                _die(f"before committing checkpoint {step} ({temporary} fully written)")

        sys.addaudithook(audit)


def main(argv):
    if _STEP.value is None:
        raise app.UsageError("--kill_at_step is required")
    install(_STEP.value, _POINT.value)
    return train_cli.main(argv)


if __name__ == "__main__":
    app.run(main)
