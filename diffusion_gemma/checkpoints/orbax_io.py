"""Our checkpoint format: an Orbax parameter tree, the model config, and what a HuggingFace export needs.

Layout of a checkpoint directory CKPT (written by `import_hf`, `save_model` and the trainer alike):

    CKPT/
      params/                  Orbax PyTree checkpoint (PyTreeCheckpointHandler, OCDBT, zarr, uncompressed) of the
                               model's variables as a nested dict of arrays keyed like `nnx.state(model)`, list
                               indices as strings: params['blocks']['0']['attn']['q_proj'] is blocks[0].attn.q_proj.
                               Stacked layer parameters keep their leading repeat axis (layer i lives in
                               blocks[i % P] at index i // P, P = ModelConfig.scan_period). Every Variable type is
                               included: Param, the layer_scalar Buffers and, when present, LoRA adapters as their
                               own leaves `<kernel>_lora/a` [R, *batch, *in, r] and `<kernel>_lora/b` [R, *batch, r,
                               *out]. Leaves keep their own dtype.
      model_config.json        ModelConfig.to_json()
      lora.json                only with adapters: {"blocks/0/attn/q_proj_lora": {"scale": 2.0, "batch_dims": 0}}
                               (scale = alpha / rank; batch_dims per layer, without the repeat axis)
      hf/                      only for a model that came from HuggingFace: the source directory's non-weight
                               files, byte for byte (config.json, generation_config.json, tokenizer files, chat
                               template, ...), plus
        extra_tensors.safetensors   every tensor the text stack does not own (vision tower, embed_vision),
                                    byte for byte in its own dtype
        text_dtypes.json            {HF key: safetensors dtype} of the original text tensors, so an export
                                    writes each tensor back in the dtype it came in
      tokenizer/               only in a training run's root: the tokenizer its data was encoded with, written when
                               the run starts (tokenizer.json or tokenizer.model, tokenizer_config.json, chat
                               template). A vocabulary that belongs to a task rather than to text (a
                               task's compact ids) says so in tokenizer_config.json (`data.tokenizer.TASK_KEY`).

A trainer's CheckpointManager root (numeric step directories, each holding `params/`) is accepted wherever a
checkpoint is read: the latest step is used, and model_config.json, lora.json, hf/ and tokenizer/ are looked up in
the step directory first, then in the root. The model's tokenizer is tokenizer/'s, else hf/'s
(`CheckpointDir.tokenizer_file`); a checkpoint without hf/ exports with generated configs (`export.py`).

Writing is streamed: a leaf may be a `StreamedArray` whose blocks are produced one at a time and written to
their zarr chunks as they come (chunks are at most one layer and about 16 MiB), so peak host memory is a few
blocks, not the checkpoint. The handler records such leaves as plain `np.ndarray` leaves, so any Orbax reader
restores them, as numpy arrays or as `jax.Array`s placed on a mesh (`restore_params`, `load_model`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from diffusion_gemma import atomic_write
from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
from diffusion_gemma.config import ConfigError, ModelConfig
from diffusion_gemma.data.tokenizer import find_tokenizer_file
from diffusion_gemma.model.lora import LoRA, lora_delta
from diffusion_gemma.model.transformer import DiffusionGemma

PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "model_config.json"
LORA_FILE = "lora.json"
HF_SUBDIR = "hf"
TOKENIZER_SUBDIR = "tokenizer"
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
TEXT_DTYPES_FILE = "text_dtypes.json"
LORA_SUFFIX = "_lora"
CHUNK_BYTES = 16 * 2**20
# Writes in flight per leaf: enough to overlap producing the next block with committing the last.
_MAX_INFLIGHT_WRITES = 8

Path = tuple[str, ...]
Index = tuple  # of ints and slices


def path_key(path) -> str:
    """('blocks', 0, 'attn', 'q_proj') -> 'blocks/0/attn/q_proj'."""
    return "/".join(str(part) for part in path)


def nest(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def model_variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """Every Variable of `model` by its string path in `nnx.state(model)`."""
    return {tuple(str(p) for p in path): variable for path, variable in nnx.to_flat_state(nnx.state(model))}


def expected_leaves(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of every variable of a model with this config (no adapters)."""
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    return {path: tuple(variable.shape) for path, variable in model_variables(abstract).items()}


def is_lora_path(path: Path) -> bool:
    return len(path) >= 2 and path[-1] in ("a", "b") and path[-2].endswith(LORA_SUFFIX)


def lora_kernel_path(adapter: Path) -> Path:
    """'blocks/0/attn/q_proj_lora' -> 'blocks/0/attn/q_proj'."""
    return adapter[:-1] + (adapter[-1][: -len(LORA_SUFFIX)],)


def lora_metadata(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """{adapter path: {scale, batch_dims, rank}} for every `LoRA` module attached to `model`."""
    return {path_key(path): {"scale": float(node.scale), "batch_dims": int(node.batch_dims), "rank": int(node.rank)}
            for path, node in nnx.iter_graph(model) if isinstance(node, LoRA)}


class Adapter(NamedTuple):
    """A stored `<kernel>_lora` adapter: the path of its `a` and `b` leaves and its scale (from lora.json)."""

    path: Path
    scale: float

    @property
    def kernel(self) -> Path:
        return lora_kernel_path(self.path)

    @property
    def name(self) -> str:
        return path_key(self.path)


def find_adapters(stored: Iterable[Path], lora: Mapping[str, Any], where: str) -> dict[Path, Adapter]:
    """{kernel path: Adapter} for every adapter among the `stored` leaf paths, each checked to have both
    factors, its kernel and a scale in lora.json."""
    stored = set(stored)
    out = {}
    for path in sorted({p[:-1] for p in stored if is_lora_path(p)}):
        name = path_key(path)
        for part in ("a", "b"):
            if path + (part,) not in stored:
                raise CheckpointError(f"{where}: adapter {name!r} has no {part!r}")
        if lora_kernel_path(path) not in stored:
            raise CheckpointError(f"{where}: adapter {name!r} has no kernel {path_key(lora_kernel_path(path))!r}")
        meta = lora.get(name)
        if not isinstance(meta, Mapping) or "scale" not in meta:
            raise CheckpointError(f"{where}: no scale recorded for adapter {name!r} (expected in {LORA_FILE})")
        out[lora_kernel_path(path)] = Adapter(path, float(meta["scale"]))
    return out


def merged_kernel(kernel, a, b, scale: float, name: str = "") -> jax.Array:
    """W + scale * a @ b, the delta computed in the factors' dtype and cast to W's, as the model's
    `effective_kernel` computes it. a [*batch, *in, r], b [*batch, r, *out]: the batch axes are whatever `a`,
    `b` and W share (a stacked kernel and its stacked factors carry one more than lora.json records)."""
    batch_dims = a.ndim + b.ndim - 2 - kernel.ndim
    delta = lora_delta(jax.numpy.asarray(a), jax.numpy.asarray(b), scale, batch_dims)
    if tuple(delta.shape) != tuple(kernel.shape):
        raise CheckpointError(f"adapter {name!r}: a {tuple(a.shape)} @ b {tuple(b.shape)} gives "
                              f"{tuple(delta.shape)}, its kernel is {tuple(kernel.shape)}")
    return jax.numpy.asarray(kernel) + delta.astype(kernel.dtype)


def merge_adapters(values: dict[Path, Any], lora: Mapping[str, Any], *, where: str) -> int:
    """Fold every adapter of a flat {path: array} tree into its kernel, in place (the `a`/`b` leaves are
    removed); numpy kernels stay numpy, device arrays keep their sharding. Returns how many were merged."""
    adapters = find_adapters(values, lora, where)
    for kernel_path, adapter in adapters.items():
        kernel = values[kernel_path]
        a, b = values.pop(adapter.path + ("a",)), values.pop(adapter.path + ("b",))
        merged = merged_kernel(kernel, a, b, adapter.scale, adapter.name)
        values[kernel_path] = (jax.device_put(merged, kernel.sharding) if isinstance(kernel, jax.Array)
                               else np.asarray(merged))
    return len(adapters)


def check_leaves(expected: Mapping[Path, tuple[int, ...]], stored: Mapping[Path, tuple[int, ...]],
                 source: str) -> None:
    """Stored non-adapter leaves must be exactly the expected ones, shape for shape; errors name the key."""
    stored_plain = {path: shape for path, shape in stored.items() if not is_lora_path(path)}
    missing = sorted(path_key(p) for p in set(expected) - set(stored_plain))
    unexpected = sorted(path_key(p) for p in set(stored_plain) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing parameter(s) {first_keys(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected parameter(s) {first_keys(unexpected)}")
    for path, shape in expected.items():
        if tuple(stored_plain[path]) != tuple(shape):
            raise CheckpointError(f"{source}: parameter {path_key(path)!r} has shape {tuple(stored_plain[path])}, "
                                  f"the model config expects {tuple(shape)}")


def first_keys(keys: list[str], count: int = 8) -> str:
    return f"{keys[:count]}{' ...' if len(keys) > count else ''}"


# --------------------------------------------------------------------------------------------- checkpoint dirs
@dataclasses.dataclass(frozen=True)
class CheckpointDir:
    """A located checkpoint: `step_dir` holds `params/`; side files are found there or in `root`."""

    root: str
    step_dir: str

    @property
    def params(self) -> str:
        return os.path.join(self.step_dir, PARAMS_ITEM)

    def find(self, name: str) -> str | None:
        for directory in (self.step_dir, self.root):
            candidate = os.path.join(directory, name)
            if os.path.exists(candidate):
                return candidate
        return None

    def tokenizer_file(self) -> str | None:
        """tokenizer.json / tokenizer.model of the run (tokenizer/), else of the HF passthrough (hf/)."""
        for name in (TOKENIZER_SUBDIR, HF_SUBDIR):
            side = self.find(name)
            found = find_tokenizer_file(side) if side else None
            if found:
                return found
        return None


def locate(checkpoint: str) -> CheckpointDir:
    """A checkpoint directory, or a CheckpointManager root (its latest numeric step that has `params/`)."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    checkpoint = os.path.abspath(checkpoint)  # Orbax reads no tree metadata through a relative path
    if os.path.isdir(os.path.join(checkpoint, PARAMS_ITEM)):
        return CheckpointDir(checkpoint, checkpoint)
    steps = [int(name) for name in os.listdir(checkpoint)
             if name.isdigit() and os.path.isdir(os.path.join(checkpoint, name, PARAMS_ITEM))]
    if not steps:
        raise CheckpointError(f"{checkpoint}: not a checkpoint (expected {PARAMS_ITEM}/ or <step>/{PARAMS_ITEM}/)")
    return CheckpointDir(checkpoint, os.path.join(checkpoint, str(max(steps))))


def read_model_config(ckpt: CheckpointDir) -> ModelConfig:
    path = ckpt.find(MODEL_CONFIG_FILE)
    if path is None:
        raise CheckpointError(f"{ckpt.step_dir}: no {MODEL_CONFIG_FILE}")
    try:
        with open(path) as f:
            return ModelConfig.from_json(f.read())
    except (ConfigError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config ({err})") from None


def read_lora(ckpt: CheckpointDir) -> dict[str, dict[str, Any]]:
    path = ckpt.find(LORA_FILE)
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CheckpointError(f"{path}: expected {{adapter path: {{scale, batch_dims}}}}")
    return data


def checkpoint_adapters(ckpt: CheckpointDir) -> dict[Path, Adapter]:
    """The adapters a checkpoint stores (a LoRA training run's), by kernel path: what the loaders merge."""
    return find_adapters(ParamReader(ckpt.params).shapes(), read_lora(ckpt), ckpt.params)


def write_metadata(directory: str, config: ModelConfig, lora: Mapping[str, Any] | None = None) -> None:
    """model_config.json and (with adapters) lora.json, each replaced whole (`atomic_write`): another process of
    a multi-host run checking a resumed workdir reads the old file or the new one."""
    atomic_write.write_text(os.path.join(directory, MODEL_CONFIG_FILE), config.to_json() + "\n", overwrite=True)
    if lora:
        atomic_write.write_json(os.path.join(directory, LORA_FILE), dict(lora), overwrite=True, sort_keys=True)


# -------------------------------------------------------------------------------------------- streamed writes
def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> tuple[int, ...]:
    """Zarr chunks: one repeat of a stacked leaf, split along its leading (row) axis into ~CHUNK_BYTES pieces."""
    chunks = [max(1, d) for d in shape]
    row_axis = 1 if stacked else 0
    if stacked and chunks:
        chunks[0] = 1
    if len(shape) > row_axis:
        row_bytes = itemsize * math.prod(shape[row_axis + 1:])
        chunks[row_axis] = max(1, min(chunks[row_axis], CHUNK_BYTES // max(row_bytes, 1)))
    return tuple(chunks)


class StreamedArray:
    """A leaf written piece by piece: `blocks()` yields (index, array) pairs that together cover the array,
    each a union of whole chunks (so no chunk is written twice)."""

    def __init__(self, shape: tuple[int, ...], dtype, blocks: Callable[["StreamedArray"], Iterator[tuple[Index, Any]]],
                 *, stacked: bool):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.stacked = stacked
        self.chunks = chunk_shape(self.shape, self.dtype.itemsize, stacked)
        self._blocks = blocks

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def chunk_rows(self) -> int:
        """Rows of the leading per-repeat axis in one chunk (the block size producers should use)."""
        axis = 1 if self.stacked else 0
        return self.chunks[axis] if len(self.chunks) > axis else 1

    def blocks(self) -> Iterator[tuple[Index, Any]]:
        return self._blocks(self)


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, `depth` items ahead, so producing the next block (file reads,
    layout transforms: numpy and pread release the GIL) overlaps with consuming the last. Exceptions are
    re-raised in the consumer; abandoning the iterator stops the producer."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((done, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            slots.put((done, err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Writes `StreamedArray` leaves block by block: one producer thread walks every leaf's blocks while
    tensorstore commits the previous ones. Its typestr stays 'np.ndarray', so readers restore these leaves
    with Orbax's standard handlers."""

    def __init__(self, on_bytes: Callable[[int], None] | None = None):
        super().__init__()
        self._on_bytes = on_bytes or (lambda n: None)

    async def serialize(self, values, infos, args=None):
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos),
                                                                  name="streamed_arrays")]

    async def _write_all(self, values, infos):
        stores = []
        for value, info in zip(values, infos):
            await info.await_path_creation()
            use_ocdbt = bool(info.is_ocdbt_checkpoint)
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.chunks, dtype=value.dtype,
                process_index=jax.process_index() if use_ocdbt else None)
            # One fsync of the whole output happens before it is published (atomic_write.atomic_directory),
            # instead of one per write.
            context = ts.Context(ts.Context.Spec({"file_io_sync": False}), parent=info.ts_context)
            stores.append(await ts.open(ts.Spec(spec), create=True, open=True, context=context))

        def blocks():
            for leaf, value in enumerate(values):
                for index, block in value.blocks():
                    yield leaf, index, np.asarray(block, dtype=value.dtype)

        pending: collections.deque = collections.deque()
        for leaf, index, block in prefetched(blocks()):
            target = stores[leaf][index]
            if tuple(target.shape) != block.shape:
                raise CheckpointError(f"{infos[leaf].name}: block {index} has shape {block.shape}, expected "
                                      f"{tuple(target.shape)}")
            pending.append((block, target.write(block, can_reference_source_data_indefinitely=True)))
            while len(pending) > _MAX_INFLIGHT_WRITES:
                await self._commit(pending.popleft())
        while pending:
            await self._commit(pending.popleft())

    async def _commit(self, item):
        block, write = item
        await write.commit
        self._on_bytes(block.nbytes)


def write_params(params_dir: str, leaves: Mapping[Path, StreamedArray],
                 on_bytes: Callable[[int], None] | None = None) -> None:
    """Write the Orbax `params` item, one leaf after another, each streamed block by block."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (StreamedArray, _StreamedArrayHandler(on_bytes)), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(epath.Path(params_dir), args=ocp.args.PyTreeSave(nest(leaves)))


def row_blocks(rows: int, block_rows: int) -> Iterator[slice]:
    for start in range(0, rows, max(1, block_rows)):
        yield slice(start, min(rows, start + max(1, block_rows)))


def array_leaf(value: Callable[[int | None], np.ndarray], shape: tuple[int, ...], dtype, *,
               stacked: bool) -> StreamedArray:
    """A StreamedArray from a per-repeat getter (`value(r)` for stacked leaves, `value(None)` otherwise), each
    repeat written in chunk-aligned row blocks."""

    def blocks(leaf: StreamedArray):
        for repeat in (range(leaf.shape[0]) if stacked else (None,)):
            array = np.asarray(value(repeat)).astype(leaf.dtype, copy=False)
            prefix = () if repeat is None else (repeat,)
            if array.ndim == 0:
                yield prefix, array
                continue
            for rows in row_blocks(array.shape[0], leaf.chunk_rows):
                yield prefix + (rows,), array[rows]

    return StreamedArray(shape, dtype, blocks, stacked=stacked)


# ---------------------------------------------------------------------------------------------------- reading
class ParamReader:
    """Leaf by leaf, slice by slice reads of a `params/` item (ours or any Orbax PyTree of arrays)."""

    def __init__(self, params_dir: str):
        self.params_dir = params_dir
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(params_dir)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CheckpointError(f"{params_dir}: not a readable Orbax checkpoint ({err})") from None
        tree = getattr(metadata, "item_metadata", metadata)
        self._use_zarr3 = bool(getattr(tree, "use_zarr3", False))
        tree = getattr(tree, "tree", tree)
        self.metadata: dict[Path, Any] = {}
        for path, meta in flatten(tree).items():
            if not hasattr(meta, "shape") or not hasattr(meta, "name"):
                raise CheckpointError(f"{params_dir}: leaf {path_key(path)!r} is not an array ({type(meta).__name__})")
            self.metadata[path] = meta
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._stores: dict[Path, Any] = {}

    def shapes(self) -> dict[Path, tuple[int, ...]]:
        return {path: tuple(meta.shape) for path, meta in self.metadata.items()}

    def dtype(self, path: Path) -> np.dtype:
        return np.dtype(self.metadata[path].dtype)

    def chunk_rows(self, path: Path, stacked: bool) -> int:
        """Rows per stored chunk along the leading per-repeat axis (reads aligned to it touch no chunk twice)."""
        axis = 1 if stacked else 0
        storage = getattr(self.metadata[path], "storage", None)
        chunks = getattr(storage, "chunk_shape", None) or self.metadata[path].shape
        return int(chunks[axis]) if len(chunks) > axis else 1

    def _store(self, path: Path):
        if path not in self._stores:
            meta = self.metadata[path]
            info = ocp.type_handlers.ParamInfo(name=meta.name, parent_dir=epath.Path(self.params_dir),
                                               is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            try:
                self._stores[path] = ts.open(ts.Spec(spec), open=True, context=self._context).result()
            except ValueError as err:
                raise CheckpointError(f"{self.params_dir}: cannot open leaf {path_key(path)!r} ({err})") from None
        return self._stores[path]

    def read(self, path: Path, index: Index = ()) -> np.ndarray:
        try:
            return np.asarray(self._store(path)[index].read().result())
        except ValueError as err:
            raise CheckpointError(f"{self.params_dir}: cannot read leaf {path_key(path)!r} ({err})") from None


def _flat_shardings(shardings) -> dict[Path, Any]:
    if isinstance(shardings, nnx.State):
        return {tuple(str(p) for p in path): (v.get_value() if isinstance(v, nnx.Variable) else v)
                for path, v in nnx.to_flat_state(shardings)}
    return flatten(shardings)


def restore_params(checkpoint: str, *, shardings=None, dtype=None) -> dict:
    """The `params` item as a nested dict of `jax.Array`s, each read straight into its sharding (a nested dict
    or an `nnx.State` of shardings, e.g. `sharding.state_shardings(abstract_model, mesh)`; leaves without one
    go to the default device). `dtype` casts every parameter on the way (default: the stored dtype); LoRA
    factors keep theirs, as the model computes the adapter delta in the factors' dtype."""
    ckpt = locate(checkpoint)
    reader = ParamReader(ckpt.params)
    flat = _flat_shardings(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {path: jax.ShapeDtypeStruct(tuple(meta.shape),
                                         np.dtype(meta.dtype if is_lora_path(path) else dtype or meta.dtype),
                                         sharding=flat.get(path, default))
              for path, meta in reader.metadata.items()}
    restored = ocp.StandardCheckpointer().restore(epath.Path(ckpt.params), nest(target))
    return restored


def load_model(checkpoint: str, *, config: ModelConfig | None = None, mesh: jax.sharding.Mesh | None = None,
               shardings=None, param_dtype: str | None = None, dtype: str | None = None) -> DiffusionGemma:
    """A `DiffusionGemma` from a checkpoint, every parameter restored straight into its sharding: `shardings` as
    in `restore_params`, or derived from the parameters' logical axes on `mesh`. LoRA adapters (a training
    run's) are merged into their kernels, so the model carries none. `config`: the model to build (default:
    the checkpoint's, with `param_dtype` / `dtype` when given); its parameter shapes must be the stored ones."""
    ckpt = locate(checkpoint)
    config = config or read_model_config(ckpt)
    config = config.replace(param_dtype=param_dtype or config.param_dtype, dtype=dtype or config.dtype)
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    stored = ParamReader(ckpt.params).shapes()
    lora = read_lora(ckpt)
    adapters = find_adapters(stored, lora, ckpt.params)
    check_leaves({p: tuple(v.shape) for p, v in model_variables(abstract).items()}, stored, ckpt.params)
    if shardings is None and mesh is not None:
        from diffusion_gemma import sharding as sharding_lib

        shardings = sharding_lib.state_shardings(abstract, mesh)
    flat_shardings = _flat_shardings(shardings) if shardings is not None else {}
    for adapter in adapters.values():
        kernel_sharding = flat_shardings.get(adapter.kernel)
        if isinstance(kernel_sharding, jax.sharding.NamedSharding):  # factors replicated on the kernel's mesh
            replicated = jax.sharding.NamedSharding(kernel_sharding.mesh, jax.sharding.PartitionSpec())
            flat_shardings[adapter.path + ("a",)] = flat_shardings[adapter.path + ("b",)] = replicated
    restored = flatten(restore_params(checkpoint, shardings=nest(flat_shardings), dtype=config.param_dtype))
    merge_adapters(restored, lora, where=ckpt.params)
    graphdef, state = nnx.split(abstract)
    flat = [(path, variable.replace(restored[tuple(str(p) for p in path)]))
            for path, variable in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
