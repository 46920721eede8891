"""Our checkpoint (or an in-memory model) -> a HuggingFace DiffusionGemma directory, streamed.

The output is what `transformers.DiffusionGemmaForBlockDiffusion.from_pretrained` loads with no missing or
unexpected keys and nothing untied: decoder text weights once under `model.decoder.`, both `layer_scalar`
copies, no `lm_head`, and shards with an index when they exceed `max_shard_size`. What is not a text weight
comes from the HuggingFace model the checkpoint came from (its `hf/` passthrough, or `base_hf_dir`): the vision
tower and embed_vision byte for byte, `config.json` regenerated from the model config over the original one,
generation config, tokenizer and other non-weight files copied. A model trained from scratch has no such
source: its config.json is `hf_config.model_config_to_hf` with an inert vision tower (`INERT_VISION_CONFIG`),
its generation_config.json the sampler's defaults with the model's special ids, and its tokenizer the one its
training run carries (the checkpoint's `tokenizer/`, which also wins over the passthrough's).

Every shard's header is planned first; then each tensor is read (one layer slice, or one block of rows when
the layout transform is row-wise), transformed and appended, so peak host memory is about one tensor.
LoRA adapters (`<kernel>_lora/{a,b}`, scale from lora.json) are merged into their kernels with `merge_lora`
(`orbax_io.merged_kernel`: W + scale * a @ b in W's dtype, as the model's `effective_kernel` computes it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from diffusion_gemma import atomic_write
from diffusion_gemma.checkpoints import orbax_io, streaming
from diffusion_gemma.checkpoints.hf_config import CONFIG_FILE, model_config_to_hf, require_hf_expressible
from diffusion_gemma.checkpoints.hf_keys import TensorMapping, tensor_mappings
from diffusion_gemma.checkpoints.safetensors_dir import DTYPES as DTYPES_BY_CODE
from diffusion_gemma.checkpoints.safetensors_dir import (CheckpointError, SafetensorsDir, SafetensorsWriter,
                                                         TensorEntry, entry, parse_size, plan_shards,
                                                         shard_file_names, write_index)
from diffusion_gemma.config import DTYPES, ModelConfig
from diffusion_gemma.sampling.sampler import GENERATION_CONFIG_FILE, SamplerConfig

# transformers gives every DiffusionGemma a vision tower (its config has no text-only form), so a model trained
# without one is exported with the smallest `gemma4_vision` tower it builds (no layers, width 1), its weights
# zero: from_pretrained then finds every key instead of initialising a tower at random, and an image embeds to
# zeros rather than to noise. Nothing of ours reads it.
INERT_VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 1, "intermediate_size": 1,
                       "num_hidden_layers": 0, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
                       "patch_size": 1, "position_embedding_size": 1, "pooling_kernel_size": 1}


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


@dataclasses.dataclass(frozen=True)
class _ExtraTensors:
    """The non-text tensors of an export in write order: their entries, and each one's bytes in pieces."""

    entries: list[TensorEntry]
    pieces: Callable[[str], Iterator[np.ndarray]]


def _passthrough_tensors(source: SafetensorsDir | None) -> _ExtraTensors:
    keys = streaming.ordered_extra_keys(source) if source is not None else []
    return _ExtraTensors([entry(k, source.info(k).dtype, source.info(k).shape) for k in keys],
                         lambda key: streaming.raw_pieces(source, key))


def _inert_vision_tensors(config: ModelConfig, dtype: np.dtype) -> _ExtraTensors:
    """The tensors of `INERT_VISION_CONFIG`'s tower (shapes as transformers lays them out), all zeros."""
    vision = INERT_VISION_CONFIG
    width, patch = vision["hidden_size"], vision["patch_size"]
    shapes = {"model.encoder.vision_tower.patch_embedder.position_embedding_table":
              (2, vision["position_embedding_size"], width),
              "model.encoder.vision_tower.patch_embedder.input_proj.weight": (width, 3 * patch * patch),
              "model.encoder.embed_vision.embedding_projection.weight": (config.hidden_size, width)}
    return _ExtraTensors([entry(key, dtype, shape) for key, shape in shapes.items()],
                         lambda key: iter([np.zeros(shapes[key], dtype)]))


def export_hf(checkpoint: str, output: str, *, base_hf_dir: str | None = None, merge_lora: bool = False,
              max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite: bool = False,
              progress: bool = True) -> streaming.ConversionSummary:
    """One of our checkpoints (full or with LoRA adapters; a training run's root included) -> a HuggingFace
    directory.

    `base_hf_dir` supplies config.json, the non-text tensors, tokenizer and other files in place of the
    checkpoint's `hf/` passthrough; with neither, they are generated (module docstring). `dtype`: text tensor
    dtype; default: the `dtype` the original HF checkpoint has (recorded at import, or read from
    `base_hf_dir`), else the dtype config.json declares, else each parameter's stored dtype.
    """
    atomic_write.check_new(output, overwrite=overwrite, inputs=[checkpoint, base_hf_dir], directory=True)
    ckpt = orbax_io.locate(checkpoint)
    config = orbax_io.read_model_config(ckpt)
    if base_hf_dir is None:
        passthrough = ckpt.find(orbax_io.HF_SUBDIR)
        weights = streaming.extra_tensor_source(passthrough) if passthrough is not None else None
    else:
        passthrough, weights = streaming.passthrough_sources(base_hf_dir)
    return _export(config, orbax_io.ParamReader(ckpt.params), orbax_io.read_lora(ckpt), passthrough, weights,
                   ckpt.find(orbax_io.TOKENIZER_SUBDIR), output, where=ckpt.params, merge_lora=merge_lora,
                   max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite, progress=progress,
                   inputs=[checkpoint, base_hf_dir])


def export_model(model: nnx.Module, output: str, *, base_hf_dir: str | None = None, merge_lora: bool = False,
                 max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite: bool = False,
                 progress: bool = False) -> streaming.ConversionSummary:
    """An in-memory (possibly sharded) model -> a HuggingFace directory; `base_hf_dir` (an HF directory or one
    of our checkpoints) supplies the passthrough, without it configs are generated (module docstring). Each
    tensor is gathered to the host on its own."""
    atomic_write.check_new(output, overwrite=overwrite, inputs=[base_hf_dir], directory=True)
    streaming.require_local(model, "export_model")
    passthrough, weights = streaming.passthrough_sources(base_hf_dir)
    return _export(model.config, _ModelSource(model), orbax_io.lora_metadata(model), passthrough, weights, None,
                   output, where="model", merge_lora=merge_lora, max_shard_size=max_shard_size, dtype=dtype,
                   overwrite=overwrite, progress=progress, inputs=[base_hf_dir])


def _export(config: ModelConfig, source, lora: Mapping[str, Any], passthrough: str | None,
            weights: SafetensorsDir | None, tokenizer_dir: str | None, output: str, *, where: str, merge_lora: bool,
            max_shard_size, dtype: str | None, overwrite: bool, progress: bool, inputs) -> streaming.ConversionSummary:
    """`passthrough`: the directory of the original non-weight files, None for a model trained from scratch;
    `weights`: the source of its non-text tensors; `tokenizer_dir`: the training run's tokenizer files."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    require_hf_expressible(config)  # before any byte is written
    max_bytes = parse_size(max_shard_size)
    try:
        stored = source.shapes()
        orbax_io.check_leaves(orbax_io.expected_leaves(config), stored, where)
        adapters = orbax_io.find_adapters(stored, lora, where)
        if adapters and not merge_lora:
            names = sorted(adapter.name for adapter in adapters.values())
            raise CheckpointError(f"{where}: has LoRA adapters {orbax_io.first_keys(names, 3)}; the HuggingFace "
                                  "format has no place for them: pass --merge_lora to merge them into the weights")
        template = _read_json(os.path.join(passthrough, CONFIG_FILE)) if passthrough is not None else None
        mappings = list(tensor_mappings(config))
        originals = streaming.original_text_dtypes(passthrough, weights) if passthrough is not None else {}
        out_dtypes = _export_dtypes(mappings, source, dtype, originals, _declared_dtype(template or {}))
        if passthrough is not None:
            extra = _passthrough_tensors(weights)
        else:
            text_dtypes = set(out_dtypes.values())
            extra = _inert_vision_tensors(config, text_dtypes.pop() if len(text_dtypes) == 1 else np.dtype(np.float32))
        entries = [entry(m.hf_key, out_dtypes[m.hf_key], m.hf_shape) for m in mappings] + extra.entries
        by_key = {m.hf_key: m for m in mappings}
        shards = plan_shards(entries, max_bytes)
        names = shard_file_names(len(shards))
        total = sum(item.nbytes for item in entries)
        bar = streaming.Progress(total, "export-hf", progress)
        with bar, atomic_write.atomic_directory(output, overwrite=overwrite, inputs=inputs) as tmp:

            def pieces():
                for shard_index, shard in enumerate(shards):
                    for item in shard:
                        if item.key in by_key:
                            blocks = _text_pieces(by_key[item.key], source, adapters, np.dtype(out_dtypes[item.key]))
                        else:
                            blocks = extra.pieces(item.key)
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
            _write_configs(tmp, config, template, set(out_dtypes.values()))
            if passthrough is not None:
                streaming.copy_passthrough(passthrough, tmp, skip=(CONFIG_FILE, orbax_io.TEXT_DTYPES_FILE))
            if tokenizer_dir is not None:
                streaming.copy_passthrough(tokenizer_dir, tmp)
        seconds = bar.close()
    finally:
        if weights is not None:
            weights.close()
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


def _text_pieces(mapping: TensorMapping, source, adapters: Mapping[tuple, orbax_io.Adapter], dtype: np.dtype):
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
        a, b = (source.read(adapter.path + (part,), prefix) for part in ("a", "b"))
        value = np.asarray(orbax_io.merged_kernel(value, a, b, adapter.scale, adapter.name))
    yield streaming.to_hf(mapping, value).astype(dtype, copy=False)


def _write_configs(directory: str, config: ModelConfig, template: Mapping[str, Any] | None, dtypes: set) -> None:
    """config.json (over the original's `template`, else generated with the inert vision tower) and, for a
    model without an original one, generation_config.json (a passthrough copy replaces it)."""
    hf_config = model_config_to_hf(config, template)
    if template is None:
        hf_config["vision_config"] = dict(INERT_VISION_CONFIG)
    if len(dtypes) == 1:
        name = str(next(iter(dtypes)))
        hf_config["dtype"] = name
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = name
        if "dtype" in hf_config.get("text_config", {}):
            hf_config["text_config"]["dtype"] = name
    for name, data in ((CONFIG_FILE, hf_config), (GENERATION_CONFIG_FILE, generation_config(config))):
        atomic_write.write_json(os.path.join(directory, name), data, overwrite=True, sort_keys=True)


def generation_config(config: ModelConfig) -> dict[str, Any]:
    """generation_config.json for a model that has none: the sampler's defaults, in the layout transformers and
    `SamplerConfig.from_generation_config` read, with the model's special ids; max_new_tokens is the default
    rounded up to whole canvases (what both samplers generate)."""
    defaults = SamplerConfig()
    return {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
            "pad_token_id": config.pad_token_id,
            "max_new_tokens": defaults.num_blocks(config.canvas_length) * config.canvas_length,
            "max_denoising_steps": defaults.max_denoising_steps, "t_min": defaults.t_min, "t_max": defaults.t_max,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": defaults.entropy_bound},
            "stability_threshold": defaults.stability_threshold,
            "confidence_threshold": defaults.confidence_threshold}
