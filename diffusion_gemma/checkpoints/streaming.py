"""Streaming conversion into our checkpoint format (`orbax_io`), and the pieces both directions share.

`import_hf` turns a HuggingFace DiffusionGemma directory into a checkpoint; `save_model` writes one from an
in-memory (possibly sharded) model. Both read, transform and write one tensor at a time, and large tensors one
block of rows at a time when the layout transform acts row by row (identity, expert-axis swaps), so peak host
memory stays near one block for those and one tensor for the rest.

Outputs are written into a hidden temporary sibling, fsynced, and renamed into place at the end
(`atomic_write.atomic_directory`): an interrupted run leaves no partial output, an existing output is only
replaced with `overwrite=True`, and an output is never one of the inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from diffusion_gemma import atomic_write
from diffusion_gemma.checkpoints import hf_keys, orbax_io
from diffusion_gemma.checkpoints.hf import check_text_keys
from diffusion_gemma.checkpoints.hf_config import model_config_from_hf_dir
from diffusion_gemma.checkpoints.hf_keys import TensorMapping, tensor_mappings
from diffusion_gemma.checkpoints.safetensors_dir import (INDEX_FILE, CheckpointError, SafetensorsDir,
                                                         SafetensorsWriter, entry)
from diffusion_gemma.config import DTYPES, ModelConfig

# Prefixes owned by the text stack: tensors under them are converted, never carried through (carrying an
# encoder copy or an lm_head would silently untie weights in transformers).
TEXT_PREFIXES = (hf_keys.DECODER, "model.encoder.language_model.", "lm_head.")
# Files of a HuggingFace directory that are weights (converted, or refused: no pickle is ever read).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".npz",
                    ".npy", ".gguf", ".index.json")
# Raw-byte copies and row blocks of big tensors move in pieces of about this size.
BLOCK_BYTES = 16 * 2**20


def is_text_side(key: str) -> bool:
    return key.startswith(TEXT_PREFIXES)


class Progress:
    """A bytes progress bar (rate in B/s) that also measures the run."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                         smoothing=0.1, dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        self._bar.update(count)

    def close(self) -> float:
        """Close the bar (idempotent); returns the seconds since the start."""
        self._bar.close()
        return time.perf_counter() - self.start

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    output: str
    tensor_bytes: int
    seconds: float

    @property
    def megabytes_per_second(self) -> float:
        return self.tensor_bytes / 1e6 / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------------------- HF passthrough
def passthrough_files(hf_dir: str) -> list[str]:
    """Top-level non-weight files of a HuggingFace directory (config, tokenizer, chat template, ...)."""
    names = []
    for name in sorted(os.listdir(hf_dir)):
        if os.path.isfile(os.path.join(hf_dir, name)) and not name.endswith(_WEIGHT_SUFFIXES):
            names.append(name)
    return names


def copy_passthrough(hf_dir: str, destination: str, skip: Sequence[str] = ()) -> None:
    os.makedirs(destination, exist_ok=True)
    for name in passthrough_files(hf_dir):
        if name not in skip:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(destination, name))


def raw_pieces(source: SafetensorsDir, key: str) -> Iterator[np.ndarray]:
    """One tensor's bytes, undecoded, in BLOCK_BYTES pieces (fresh buffers, so they may be queued)."""
    info = source.info(key)
    for start in range(0, info.nbytes, BLOCK_BYTES):
        piece = np.empty(min(BLOCK_BYTES, info.nbytes - start), np.uint8)
        source.read_into(key, memoryview(piece), start)
        yield piece


def write_extra_tensors(source: SafetensorsDir, keys: Sequence[str], path: str, progress: Progress | None) -> None:
    """The non-text tensors, byte for byte, into one safetensors file (skipped when there are none)."""
    if not keys:
        return
    writer = SafetensorsWriter(path, [entry(k, source.info(k).dtype, source.info(k).shape) for k in keys])
    try:
        for key in keys:
            for piece in raw_pieces(source, key):
                writer.write(key, piece)
                if progress is not None:
                    progress.update(piece.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def ordered_extra_keys(source: SafetensorsDir) -> list[str]:
    """Non-text keys in on-disk order (file, then offset), so copies read sequentially."""
    keys = [k for k in source.keys() if not is_text_side(k)]
    return sorted(keys, key=lambda k: (source.info(k).path, source.info(k).start))


# ------------------------------------------------------------------------------------------------ validation
def check_hf_tensors(config: ModelConfig, source: SafetensorsDir) -> list[TensorMapping]:
    """Every text tensor present with its expected shape, no unexpected text-side tensor; errors name the key
    (and the file and both shapes for a mis-shaped one). Returns the mappings in table order."""
    mappings = list(tensor_mappings(config))
    check_text_keys(config, set(source.keys()), source.hf_dir, is_text=is_text_side)
    for mapping in mappings:
        info = source.info(mapping.hf_key)
        if info.shape != mapping.hf_shape:
            raise CheckpointError(f"{info.path}: tensor {mapping.hf_key!r} has shape {info.shape}, the config "
                                  f"expects {mapping.hf_shape}")
        if info.dtype not in ("F32", "BF16", "F16", "F64"):
            raise CheckpointError(f"{info.path}: tensor {mapping.hf_key!r} has dtype {info.dtype}, expected a "
                                  "floating-point dtype")
    return mappings


def group_by_path(mappings: Sequence[TensorMapping]) -> dict[tuple, list[TensorMapping]]:
    """Mappings per parameter path (string parts), each list ordered by repeat."""
    groups: dict[tuple, list[TensorMapping]] = {}
    for mapping in mappings:
        groups.setdefault(tuple(str(p) for p in mapping.path), []).append(mapping)
    for group in groups.values():
        group.sort(key=lambda m: -1 if m.repeat is None else m.repeat)
    return groups


def is_rowwise(mapping: TensorMapping) -> bool:
    """True when the layout transform maps HF leading-axis rows to our leading-axis rows one to one, so a big
    tensor can be converted a block of rows at a time."""
    if mapping.to_ours is hf_keys._identity:
        return len(mapping.hf_shape) >= 1
    return mapping.to_ours is hf_keys._swap_last and len(mapping.hf_shape) >= 3


def swap_last(x: np.ndarray, tile: tuple[int, int] = (64, 512)) -> np.ndarray:
    """`hf_keys._swap_last` (a contiguous swap of the last two axes), tile by tile: about twice as fast as
    numpy's strided copy on the expert tensors, which dominate conversion time."""
    *lead, rows, cols = x.shape
    out = np.empty((*lead, cols, rows), x.dtype)
    for i in range(0, rows, tile[0]):
        for j in range(0, cols, tile[1]):
            out[..., j:j + tile[1], i:i + tile[0]] = np.swapaxes(x[..., i:i + tile[0], j:j + tile[1]], -1, -2)
    return out


def to_ours(mapping: TensorMapping, x: np.ndarray) -> np.ndarray:
    return swap_last(x) if mapping.to_ours is hf_keys._swap_last else mapping.to_ours(x)


def to_hf(mapping: TensorMapping, x: np.ndarray) -> np.ndarray:
    return swap_last(x) if mapping.to_hf is hf_keys._swap_last else mapping.to_hf(x)


# ----------------------------------------------------------------------------------------------------- import
def import_hf(hf_dir: str, output: str, *, dtype: str | None = None, overwrite: bool = False,
              progress: bool = True) -> ConversionSummary:
    """HuggingFace DiffusionGemma directory -> our checkpoint (layout: `orbax_io`).

    Text tensors keep their stored dtype unless `dtype` ('bfloat16', 'float32', 'float16') is given; everything
    else (non-weight files, non-text tensors) is carried through byte for byte.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    atomic_write.check_new(output, overwrite=overwrite, inputs=[hf_dir], directory=True)
    config = model_config_from_hf_dir(hf_dir)
    with SafetensorsDir(hf_dir) as source:
        mappings = check_hf_tensors(config, source)
        groups = group_by_path(mappings)
        leaf_dtypes = {}
        for path, group in groups.items():
            dtypes = {source.info(m.hf_key).np_dtype for m in group}
            if dtype is None and len(dtypes) > 1:
                raise CheckpointError(f"{hf_dir}: the tensors of {orbax_io.path_key(path)!r} have different dtypes "
                                      f"{sorted(map(str, dtypes))}; pass dtype to choose one")
            leaf_dtypes[path] = np.dtype(jnp.dtype(dtype)) if dtype else dtypes.pop()
        embed_dtype = str(leaf_dtypes[("embedder", "embedding")])
        param_dtype = dtype or embed_dtype
        if param_dtype not in DTYPES:
            raise CheckpointError(f"{hf_dir}: text tensors are {param_dtype}; pass dtype (one of {DTYPES})")
        config = config.replace(param_dtype=param_dtype, dtype=param_dtype)
        expected = orbax_io.expected_leaves(config)
        if set(expected) != set(groups):
            raise CheckpointError(f"the HF key table and the model disagree on "
                                  f"{sorted(map(orbax_io.path_key, set(expected) ^ set(groups)))}")

        leaves = {path: _hf_leaf(source, group, expected[path], leaf_dtypes[path])
                  for path, group in groups.items()}
        extra = ordered_extra_keys(source)
        total = sum(leaf.nbytes for leaf in leaves.values()) + sum(source.info(k).nbytes for k in extra)
        bar = Progress(total, "import-hf", progress)
        with bar, atomic_write.atomic_directory(output, overwrite=overwrite, inputs=[hf_dir]) as tmp:
            orbax_io.write_metadata(tmp, config)
            hf_out = os.path.join(tmp, orbax_io.HF_SUBDIR)
            copy_passthrough(hf_dir, hf_out)
            atomic_write.write_json(os.path.join(hf_out, orbax_io.TEXT_DTYPES_FILE),
                                    {m.hf_key: source.info(m.hf_key).dtype for m in mappings}, overwrite=True,
                                    sort_keys=True)
            write_extra_tensors(source, extra, os.path.join(hf_out, orbax_io.EXTRA_TENSORS_FILE), bar)
            orbax_io.write_params(os.path.join(tmp, orbax_io.PARAMS_ITEM), leaves, bar.update)
        seconds = bar.close()
    return ConversionSummary(os.path.abspath(output), total, seconds)


def _hf_leaf(source: SafetensorsDir, group: list[TensorMapping], shape: tuple[int, ...],
             dtype: np.dtype) -> orbax_io.StreamedArray:
    """One parameter streamed from its HF tensor(s): row blocks straight from the file when the transform is
    row-wise, else the whole tensor transformed at once."""
    stacked = group[0].repeat is not None

    def blocks(leaf: orbax_io.StreamedArray):
        for mapping in group:
            prefix = () if mapping.repeat is None else (mapping.repeat,)
            if is_rowwise(mapping):
                for rows in orbax_io.row_blocks(mapping.hf_shape[0], leaf.chunk_rows):
                    block = source.read_rows(mapping.hf_key, rows.start, rows.stop)
                    yield prefix + (rows,), to_ours(mapping, block).astype(dtype, copy=False)
                continue
            value = to_ours(mapping, source.read(mapping.hf_key)).astype(dtype, copy=False)
            if value.ndim == 0:
                yield prefix, value
                continue
            for rows in orbax_io.row_blocks(value.shape[0], leaf.chunk_rows):
                yield prefix + (rows,), value[rows]

    return orbax_io.StreamedArray(shape, dtype, blocks, stacked=stacked)


# -------------------------------------------------------------------------------------------- in-memory save
def save_model(model: nnx.Module, output: str, *, hf_dir: str | None = None, overwrite: bool = False,
               progress: bool = False) -> ConversionSummary:
    """Write `model` (any sharding; adapters included) as our checkpoint, gathering one layer slice of one
    parameter at a time. `hf_dir`: a HuggingFace directory (or one of our checkpoints) whose non-weight files
    and non-text tensors become the export passthrough."""
    atomic_write.check_new(output, overwrite=overwrite, inputs=[hf_dir], directory=True)
    require_local(model, "save_model")
    variables = orbax_io.model_variables(model)
    stacked_paths = _stacked_paths(model)

    def leaf(path: tuple, variable: nnx.Variable) -> orbax_io.StreamedArray:
        value = variable.get_value()
        stacked = path in stacked_paths

        def get(repeat):
            return jax.device_get(value if repeat is None else value[repeat])

        return orbax_io.array_leaf(get, tuple(value.shape), np.dtype(value.dtype), stacked=stacked)

    leaves = {path: leaf(path, variable) for path, variable in variables.items()}
    passthrough, extra_source = passthrough_sources(hf_dir)
    extra = ordered_extra_keys(extra_source) if extra_source is not None else []
    total = sum(x.nbytes for x in leaves.values()) + sum(extra_source.info(k).nbytes for k in extra)
    bar = Progress(total, "save", progress)
    try:
        with bar, atomic_write.atomic_directory(output, overwrite=overwrite, inputs=[hf_dir]) as tmp:
            orbax_io.write_metadata(tmp, model.config, orbax_io.lora_metadata(model))
            if passthrough is not None:
                write_passthrough(passthrough, extra_source, os.path.join(tmp, orbax_io.HF_SUBDIR), bar)
            orbax_io.write_params(os.path.join(tmp, orbax_io.PARAMS_ITEM), leaves, bar.update)
    finally:
        if extra_source is not None:
            extra_source.close()
    return ConversionSummary(os.path.abspath(output), total, bar.close())


def require_local(model: nnx.Module, what: str) -> None:
    """In-memory writers gather each tensor to this host, which cannot see the shards of other processes: a
    multi-process model is exported from its training checkpoint instead (saved collectively by Orbax)."""
    for path, variable in orbax_io.model_variables(model).items():
        value = variable.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            raise CheckpointError(f"{what}: parameter {orbax_io.path_key(path)} spans several processes; save a "
                                  "training checkpoint and run `python -m diffusion_gemma.convert export-hf "
                                  "--checkpoint=WORKDIR/checkpoints` on one host")


def _stacked_paths(model: nnx.Module) -> set[tuple]:
    """Paths of variables that carry the stacked-layers axis (everything under `blocks`)."""
    return {path for path in orbax_io.model_variables(model) if path[0] == "blocks"}


def passthrough_sources(hf_dir: str | None, *, required: bool = True) -> tuple[str | None, SafetensorsDir | None]:
    """(directory of non-weight files, source of non-text tensors) for an HF directory or one of our
    checkpoints; (None, None) without one, or (`required` False) for a checkpoint without an hf/ passthrough."""
    if hf_dir is None:
        return None, None
    if os.path.isdir(os.path.join(hf_dir, orbax_io.PARAMS_ITEM)) or not _has_weights(hf_dir):
        try:
            ckpt = orbax_io.locate(hf_dir)
        except CheckpointError:
            ckpt = None
        passthrough = ckpt.find(orbax_io.HF_SUBDIR) if ckpt else None
        if passthrough is None and ckpt is not None and not required:
            return None, None
        if passthrough is None:
            raise CheckpointError(f"{hf_dir}: neither a HuggingFace directory nor a checkpoint with "
                                  f"{orbax_io.HF_SUBDIR}/")
        return passthrough, extra_tensor_source(passthrough)
    return hf_dir, SafetensorsDir(hf_dir)


def write_passthrough(passthrough: str, weights: SafetensorsDir | None, destination: str,
                      progress: Progress | None = None) -> None:
    """An `hf/` passthrough directory (layout: `orbax_io`) from what `passthrough_sources` returns: the
    non-weight files, the original text tensors' dtypes and the non-text tensors byte for byte."""
    copy_passthrough(passthrough, destination)
    atomic_write.write_json(os.path.join(destination, orbax_io.TEXT_DTYPES_FILE),
                            original_text_dtypes(passthrough, weights), overwrite=True, sort_keys=True)
    if weights is not None:
        write_extra_tensors(weights, ordered_extra_keys(weights),
                            os.path.join(destination, orbax_io.EXTRA_TENSORS_FILE), progress)


def _has_weights(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in ("model.safetensors", INDEX_FILE))


def original_text_dtypes(passthrough: str, weights: SafetensorsDir | None) -> dict[str, str]:
    """{HF key: safetensors dtype} of the original text tensors: recorded in our passthrough, or read from the
    headers of an HF directory's weights; {} when neither knows."""
    path = os.path.join(passthrough, orbax_io.TEXT_DTYPES_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if weights is None:
        return {}
    return {key: weights.info(key).dtype for key in weights.keys() if is_text_side(key)}


def extra_tensor_source(passthrough: str) -> SafetensorsDir | None:
    path = os.path.join(passthrough, orbax_io.EXTRA_TENSORS_FILE)
    return SafetensorsDir(path) if os.path.exists(path) else None
