"""`python -m diffusion_gemma.train` that SIGKILLs itself in the middle of saving one checkpoint.

    python experiments/fault_drills/crashing_train.py --kill_at_step=4 --kill_point=commit \\
        --config=CONFIG --workdir=DIR [any other flag of diffusion_gemma.train]

Kill points, both inside the save of step `--kill_at_step`:
  write   right after the trainer hands the checkpoint to Orbax: the asynchronous write is under way.
  commit  every file of the checkpoint is written, just before Orbax renames its temporary directory to the
          step's name (the commit). The most data on disk without a complete checkpoint.
With several processes only process 0 commits, so `commit` kills process 0 (the others then wait for it).
"""

from __future__ import annotations

import os
import signal

import jax
from absl import app, flags
from orbax.checkpoint._src.path import atomicity

from diffusion_gemma import train as train_cli
from diffusion_gemma.training import checkpointing

_STEP = flags.DEFINE_integer("kill_at_step", None, "Step whose checkpoint save is interrupted.", required=True)
_POINT = flags.DEFINE_enum("kill_point", "commit", ["write", "commit"], "Where in the save to die (see above).")


def _die(where: str) -> None:
    print(f"crashing_train: SIGKILL in process {jax.process_index()} {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


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
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == str(step):
                _die(f"before committing checkpoint {step} ({self.get().name} fully written)")
            return await original_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv):
    install(_STEP.value, _POINT.value)
    return train_cli.main(argv)


if __name__ == "__main__":
    app.run(main)
