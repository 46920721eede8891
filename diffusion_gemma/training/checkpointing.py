"""Training checkpoints with Orbax's CheckpointManager, in the layout the converter reads
(`diffusion_gemma/checkpoints/orbax_io.py`): WORKDIR/checkpoints/<step>/{params, opt_state, train_state} plus
model_config.json, lora.json, the HuggingFace passthrough of the weights the run started from (hf/) and the
tokenizer its data was encoded with (tokenizer/) at the root, so `export-hf --checkpoint=WORKDIR/checkpoints`,
`generate --checkpoint=WORKDIR/checkpoints` and evaluation work on any training run with no other input.

The trainer hands over `nnx.State`s. Orbax stores plain nested dicts keyed like `nnx.state(model)`, list indices
as strings (`state_to_tree`): the layout `orbax_io` and the converter read. This module converts at save and
restore only, because saving the States themselves would add each Variable's `.value` to every optimizer-state
path and integer keys to the parameters, and existing checkpoints would no longer restore.

With several processes every process calls save and restore (Orbax writes each array's shards from the process
that holds them and commits once); only process 0 writes the root metadata files.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from flax import nnx

from diffusion_gemma import atomic_write, distributed
from diffusion_gemma.checkpoints import orbax_io, streaming
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data.tokenizer import Tokenizer


_MANAGERS = itertools.count()


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of another model; nothing is overwritten."""


class InsufficientSpaceError(OSError):
    """The checkpoint directory's disk cannot hold one more checkpoint; raised before training starts."""


def state_to_tree(*states: nnx.State) -> dict:
    """nnx.States (e.g. the trainable and the frozen part of one model) -> one nested dict of their arrays,
    keyed like `nnx.state(model)` with list indices as strings."""
    return orbax_io.nest({tuple(str(p) for p in path): variable.get_value()
                          for state in states for path, variable in nnx.to_flat_state(state)})


def tree_to_state(template: nnx.State, tree: Mapping) -> nnx.State:
    """The part of `tree` (from `state_to_tree`) at `template`'s paths, as an nnx.State with the template's
    Variable types and metadata (the template may be abstract)."""
    flat = orbax_io.flatten(tree)
    return nnx.from_flat_state([(path, variable.replace(flat[tuple(str(p) for p in path)]))
                                for path, variable in nnx.to_flat_state(template)])


def _is_state(node: Any) -> bool:
    return isinstance(node, nnx.State)


def _opt_state_to_tree(opt_state: Any) -> Any:
    """An optax state over nnx.States -> the same over `state_to_tree` dicts."""
    return jax.tree.map(lambda node: state_to_tree(node) if _is_state(node) else node, opt_state, is_leaf=_is_state)


def _opt_state_from_tree(template: Any, tree: Any) -> Any:
    return jax.tree.map(lambda node, value: tree_to_state(node, value) if _is_state(node) else value, template,
                        tree, is_leaf=_is_state)


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings: a restore target that puts every array onto the current mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _write_passthrough(source: str, destination: str) -> None:
    """`source`'s hf/ passthrough (nothing for one of our checkpoints that has none)."""
    passthrough, weights = streaming.passthrough_sources(source, required=False)
    if passthrough is None:
        return
    try:
        streaming.write_passthrough(passthrough, weights, destination)
    finally:
        if weights is not None:
            weights.close()


class TrainCheckpointer:
    """Save every N steps (and on demand), keep K, asynchronously; restore the latest onto any mesh."""

    def __init__(self, directory: str, *, model_config: ModelConfig, lora: Mapping[str, Any] | None,
                 keep: int, async_save: bool, hf_source: str | None = None, tokenizer: Tokenizer | None = None):
        """`hf_source`: where the initial weights came from (a HuggingFace directory, or one of our checkpoints
        with or without hf/), whose passthrough the root keeps; `tokenizer`: the run's. Both are written once:
        a resumed run keeps what its first start wrote."""
        self.directory = os.path.abspath(directory)
        self._check_compatible(model_config, lora)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        # Orbax's first cross-process sync is a device collective, which (on CPU) waits only 30 s for the others.
        distributed.barrier(f"checkpoint_manager_{next(_MANAGERS)}")
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if jax.process_index() == 0:
            orbax_io.write_metadata(self.directory, model_config, lora)
            if hf_source:
                self._write_side_dir(orbax_io.HF_SUBDIR, lambda tmp: _write_passthrough(hf_source, tmp))
            if tokenizer is not None:
                self._write_side_dir(orbax_io.TOKENIZER_SUBDIR, tokenizer.save)

    def _write_side_dir(self, name: str, write: Callable[[str], None]) -> None:
        """root/name, unless it exists, written into a temporary sibling renamed at the end (never half)."""
        target = os.path.join(self.directory, name)
        if os.path.exists(target):
            return
        with atomic_write.atomic_directory(target, overwrite=False, skip_if_empty=True) as tmp:
            write(tmp)

    def _check_compatible(self, model_config: ModelConfig, lora: Mapping[str, Any] | None) -> None:
        config_path = os.path.join(self.directory, orbax_io.MODEL_CONFIG_FILE)
        if not os.path.exists(config_path):
            return
        with open(config_path) as f:
            stored = ModelConfig.from_json(f.read())
        architecture = lambda c: c.replace(dtype="float32", param_dtype="float32", moe_impl="grouped",  # noqa: E731
                                           moe_capacity_factor=None)
        if architecture(stored) != architecture(model_config):
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints of a different model ({config_path}); use another --workdir")
        lora_path = os.path.join(self.directory, orbax_io.LORA_FILE)
        stored_lora = json.load(open(lora_path)) if os.path.exists(lora_path) else {}
        if set(stored_lora) != set(lora or {}):
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints with different LoRA adapters ({lora_path}); use another --workdir")

    def check_free_space(self, *trees: Any) -> None:
        """Refuse to start when the disk cannot take one checkpoint of `trees`, rather than fail at the first
        save. The estimate: their global bytes (what all processes together write to a shared directory) + 5%
        + 2 MiB of metadata and small files (a tiny model's 0.55 MB of arrays take 1.4 MB on disk)."""
        needed = int(1.05 * sum(leaf.nbytes for tree in trees for leaf in jax.tree.leaves(tree))) + 2**21
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise InsufficientSpaceError(
                f"{self.directory}: {free / 1e6:.2f} MB free on its disk, one checkpoint needs about "
                f"{needed / 1e6:.2f} MB (parameters and optimizer state); free some space or use another --workdir")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, params: Sequence[nnx.State], opt_state: Any, train_state: Mapping,
             force: bool = False) -> bool:
        """`params`: the model's state in parts (e.g. trainable and frozen), saved as one tree."""
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state_to_tree(*params)),
            opt_state=ocp.args.StandardSave(_opt_state_to_tree(opt_state)),
            train_state=ocp.args.JsonSave(dict(train_state))), force=force)

    def restore(self, step: int, *, params: Sequence[nnx.State],
                opt_state: Any) -> tuple[tuple[nnx.State, ...], Any, dict]:
        """Checkpoint `step` in the form of `params` (its parts) and `opt_state`, whose arrays (or abstract
        arrays) give the shardings: the arrays land on the current mesh, whatever mesh saved them."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(state_to_tree(*params))),
                opt_state=ocp.args.StandardRestore(_abstract(_opt_state_to_tree(opt_state))),
                train_state=ocp.args.JsonRestore()))
        except ValueError as err:
            raise IncompatibleCheckpointError(
                f"{self.directory}/{step}: cannot restore into this run's parameters/optimizer state (was the "
                f"optimizer or LoRA setup changed?): {err}") from None
        parts = tuple(tree_to_state(part, restored.params) for part in params)
        return parts, _opt_state_from_tree(opt_state, restored.opt_state), dict(restored.train_state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
