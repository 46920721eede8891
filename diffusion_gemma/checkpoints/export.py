"""Our checkpoint (or an in-memory model) -> a HuggingFace DiffusionGemma directory, streamed.

The output is what `transformers.DiffusionGemmaForBlockDiffusion.from_pretrained` loads with no missing or
unexpected keys and nothing untied: decoder text weights once under `model.decoder.`, both `layer_scalar`
copies, no `lm_head`, the non-text tensors (vision tower, embed_vision) byte for byte from the passthrough,
`config.json` regenerated from the model config over the original one, `generation_config.json`, tokenizer and
other non-weight files copied, and shards with an index when they exceed `max_shard_size`.

Every shard's header is planned first; then each tensor is read (one layer slice, or one block of rows when
the layout transform is row-wise), transformed and appended, so peak host memory is about one tensor.
LoRA adapters (`<kernel>_lora/{a,b}`, scale from lora.json) are merged into their kernels with `merge_lora`:
W + lora_delta(a, b, scale, batch_dims), in W's dtype, exactly as the model's `effective_kernel` computes it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from diffusion_gemma.checkpoints import orbax_io, streaming
from diffusion_gemma.checkpoints.hf_keys import TensorMapping, tensor_mappings
from diffusion_gemma.checkpoints.safetensors_dir import DTYPES as DTYPES_BY_CODE
from diffusion_gemma.checkpoints.safetensors_dir import (CheckpointError, SafetensorsDir, SafetensorsWriter, entry,
                                                         parse_size, plan_shards, shard_file_names, write_index)
from diffusion_gemma.config import DTYPES, ModelConfig
from diffusion_gemma.model.lora import lora_delta

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class _ModelSource:
    """The ParamReader interface over an in-memory model: slices are gathered to the host one at a time."""

    def __init__(self, model: nnx.Module):
        self._values = {path: variable.get_value() for path, variable in orbax_io.model_variables(model).items()}

    def shapes(self) -> dict[tuple, tuple[int, ...]]:
        return {path: tuple(value.shape) for path, value in self._values.items()}

    def dtype(self, path) -> np.dtype:
        return np.dtype(self._values[path].dtype)

    def chunk_rows(self, path, stacked: bool) -> int:
        return 1

    def read(self, path, index=()) -> np.ndarray:
        return np.asarray(jax.device_get(self._values[path][index]))


def export_hf(checkpoint: str, output: str, *, base_hf_dir: str | None = None, merge_lora: bool = False,
              max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite: bool = False,
              progress: bool = True) -> streaming.ConversionSummary:
    """One of our checkpoints (full or with LoRA adapters) -> a HuggingFace directory.

    `base_hf_dir` supplies config.json, the non-text tensors, tokenizer and other files when the checkpoint
    carries no `hf/` passthrough (or to replace it). `dtype`: text tensor dtype; default: the `dtype` the
    original HF checkpoint has (recorded at import, or read from `base_hf_dir`), else the dtype config.json
    declares, else each parameter's stored dtype.
    """
    streaming.check_output(output, overwrite=overwrite, inputs=[checkpoint, base_hf_dir])
    ckpt = orbax_io.locate(checkpoint)
    config = orbax_io.read_model_config(ckpt)
    if base_hf_dir is None:
        passthrough = ckpt.find(orbax_io.HF_SUBDIR)
        if passthrough is None:
            raise CheckpointError(f"{checkpoint}: the checkpoint has no {orbax_io.HF_SUBDIR}/ passthrough "
                                  "(config.json, vision tower, tokenizer); pass --base_hf_dir")
        extra = streaming.extra_tensor_source(passthrough)
    else:
        passthrough, extra = streaming.passthrough_sources(base_hf_dir)
    source = orbax_io.ParamReader(ckpt.params)
    return _export(config, source, orbax_io.read_lora(ckpt), passthrough, extra, output, where=ckpt.params,
                   merge_lora=merge_lora, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite,
                   progress=progress, inputs=[checkpoint, base_hf_dir])


def export_model(model: nnx.Module, output: str, *, base_hf_dir: str, merge_lora: bool = False,
                 max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite: bool = False,
                 progress: bool = False) -> streaming.ConversionSummary:
    """An in-memory (possibly sharded) model -> a HuggingFace directory; `base_hf_dir` (an HF directory or one
    of our checkpoints) supplies the passthrough. Each tensor is gathered to the host on its own."""
    streaming.check_output(output, overwrite=overwrite, inputs=[base_hf_dir])
    streaming.require_local(model, "export_model")
    passthrough, extra = streaming.passthrough_sources(base_hf_dir)
    return _export(model.config, _ModelSource(model), orbax_io.lora_metadata(model), passthrough, extra, output,
                   where="model", merge_lora=merge_lora, max_shard_size=max_shard_size, dtype=dtype,
                   overwrite=overwrite, progress=progress, inputs=[base_hf_dir])


def _export(config: ModelConfig, source, lora: Mapping[str, Any], passthrough: str, extra: SafetensorsDir | None,
            output: str, *, where: str, merge_lora: bool, max_shard_size, dtype: str | None, overwrite: bool,
            progress: bool, inputs) -> streaming.ConversionSummary:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    try:
        stored = source.shapes()
        orbax_io.check_leaves(orbax_io.expected_leaves(config), stored, where)
        adapters = _adapters(stored, lora, where)
        if adapters and not merge_lora:
            names = sorted(orbax_io.path_key(a["adapter"]) for a in adapters.values())
            raise CheckpointError(f"{where}: has LoRA adapters {orbax_io.first_keys(names)}; the HuggingFace format "
                                  "has no place for them: pass --merge_lora to merge them into the base weights")
        template = _read_json(os.path.join(passthrough, CONFIG_FILE))
        mappings = list(tensor_mappings(config))
        out_dtypes = _export_dtypes(mappings, source, dtype, streaming.original_text_dtypes(passthrough, extra),
                                    _declared_dtype(template))
        extra_keys = streaming.ordered_extra_keys(extra) if extra is not None else []
        entries = [entry(m.hf_key, out_dtypes[m.hf_key], m.hf_shape) for m in mappings]
        entries += [entry(k, extra.info(k).dtype, extra.info(k).shape) for k in extra_keys]
        by_key = {m.hf_key: m for m in mappings}
        shards = plan_shards(entries, max_bytes)
        names = shard_file_names(len(shards))
        total = sum(item.nbytes for item in entries)
        bar = streaming.Progress(total, "export-hf", progress)
        with bar, streaming.atomic_output(output, overwrite=overwrite, inputs=inputs) as tmp:

            def pieces():
                for shard_index, shard in enumerate(shards):
                    for item in shard:
                        if item.key in by_key:
                            blocks = _text_pieces(by_key[item.key], source, adapters, np.dtype(out_dtypes[item.key]))
                        else:
                            blocks = streaming.raw_pieces(extra, item.key)
                        for block in blocks:
                            yield shard_index, item.key, block

            writers: list[SafetensorsWriter] = []

            def open_until(shard_index: int) -> None:
                while len(writers) <= shard_index:
                    if writers:
                        writers[-1].close()
                    writers.append(SafetensorsWriter(os.path.join(tmp, names[len(writers)]), shards[len(writers)]))

            try:
                # Reading and transforming the next pieces (a thread) overlaps with writing the last ones.
                for shard_index, key, block in orbax_io.prefetched(pieces()):
                    open_until(shard_index)
                    writers[-1].write(key, block)
                    bar.update(block.nbytes)
                open_until(len(shards) - 1)
                if writers:
                    writers[-1].close()
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            if len(shards) > 1:
                write_index(tmp, shards, names)
            _write_configs(tmp, config, template, passthrough, set(out_dtypes.values()))
        seconds = bar.close()
    finally:
        if extra is not None:
            extra.close()
    return streaming.ConversionSummary(os.path.abspath(output), total, seconds)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the export needs the original config.json)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


def _declared_dtype(template: Mapping[str, Any]) -> str | None:
    for key in ("dtype", "torch_dtype"):
        if template.get(key) in DTYPES:
            return template[key]
    return None


def _export_dtypes(mappings, source, dtype: str | None, originals: Mapping[str, str],
                   declared: str | None) -> dict[str, np.dtype]:
    """Per HF key: `dtype` if given; else the tensor's original dtype; else the config's declared dtype; else
    the stored one."""
    out = {}
    for mapping in mappings:
        if dtype or mapping.hf_key not in originals:
            name = dtype or declared
            path = tuple(str(p) for p in mapping.path)
            out[mapping.hf_key] = np.dtype(jax.numpy.dtype(name)) if name else source.dtype(path)
        else:
            out[mapping.hf_key] = DTYPES_BY_CODE[originals[mapping.hf_key]]
    return out


def _adapters(stored: Mapping[tuple, tuple[int, ...]], lora: Mapping[str, Any], where: str) -> dict[tuple, dict]:
    """{kernel path: {scale, batch_dims}} for every adapter in the checkpoint, validated."""
    adapter_paths = {path[:-1] for path in stored if orbax_io.is_lora_path(path)}
    out = {}
    for adapter in sorted(adapter_paths):
        name = orbax_io.path_key(adapter)
        for part in ("a", "b"):
            if adapter + (part,) not in stored:
                raise CheckpointError(f"{where}: adapter {name!r} has no {part!r}")
        kernel = orbax_io.lora_kernel_path(adapter)
        if kernel not in stored:
            raise CheckpointError(f"{where}: adapter {name!r} has no kernel {orbax_io.path_key(kernel)!r}")
        meta = lora.get(name)
        if meta is None or "scale" not in meta:
            raise CheckpointError(f"{where}: no scale recorded for adapter {name!r} (expected in "
                                  f"{orbax_io.LORA_FILE})")
        out[kernel] = {"adapter": adapter, "scale": float(meta["scale"]), "batch_dims": meta.get("batch_dims")}
    return out


def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, batch_dims: int | None,
                  name: str = "") -> np.ndarray:
    """W + scale * a @ b, the delta cast to W's dtype first (as `effective_kernel`)."""
    if batch_dims is None:
        batch_dims = a.ndim + b.ndim - 2 - kernel.ndim
    delta = lora_delta(jax.numpy.asarray(a), jax.numpy.asarray(b), scale, batch_dims)
    if tuple(delta.shape) != kernel.shape:
        raise CheckpointError(f"adapter {name!r}: a {a.shape} @ b {b.shape} gives {tuple(delta.shape)}, the kernel "
                              f"is {kernel.shape}")
    return np.asarray(jax.numpy.asarray(kernel) + delta.astype(kernel.dtype))


def _text_pieces(mapping: TensorMapping, source, adapters: Mapping[tuple, dict], dtype: np.dtype):
    """One text tensor in HF layout and `dtype`: blocks of rows when the transform is row-wise (and no adapter
    is merged), else the whole layer slice."""
    path = tuple(str(p) for p in mapping.path)
    stacked = mapping.repeat is not None
    prefix = (mapping.repeat,) if stacked else ()
    adapter = adapters.get(path)
    if adapter is None and streaming.is_rowwise(mapping) and mapping.hf_shape[0] > 0:
        row_bytes = dtype.itemsize * int(np.prod(mapping.hf_shape[1:]))
        chunk = max(1, source.chunk_rows(path, stacked))
        block_rows = chunk * max(1, streaming.BLOCK_BYTES // max(1, chunk * row_bytes))
        for block in orbax_io.row_blocks(mapping.hf_shape[0], block_rows):
            yield streaming.to_hf(mapping, source.read(path, prefix + (block,))).astype(dtype, copy=False)
        return
    value = source.read(path, prefix)
    if adapter is not None:
        name = orbax_io.path_key(adapter["adapter"])
        a = source.read(adapter["adapter"] + ("a",), prefix)
        b = source.read(adapter["adapter"] + ("b",), prefix)
        value = merged_kernel(value, a, b, adapter["scale"], adapter["batch_dims"], name)
    yield streaming.to_hf(mapping, value).astype(dtype, copy=False)


def _write_configs(directory: str, config: ModelConfig, template: Mapping[str, Any], passthrough: str,
                   dtypes: set) -> None:
    hf_config = config.to_hf_config(template)
    if len(dtypes) == 1:
        name = str(next(iter(dtypes)))
        hf_config["dtype"] = name
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = name
        if "dtype" in hf_config.get("text_config", {}):
            hf_config["text_config"]["dtype"] = name
    orbax_io.write_json(os.path.join(directory, CONFIG_FILE), hf_config)
    if not os.path.exists(os.path.join(passthrough, GENERATION_CONFIG_FILE)):
        orbax_io.write_json(os.path.join(directory, GENERATION_CONFIG_FILE),
                            {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                             "eos_token_id": list(config.eos_token_ids)})
    streaming.copy_passthrough(passthrough, directory, skip=(CONFIG_FILE, orbax_io.TEXT_DTYPES_FILE))
