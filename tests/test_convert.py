"""The checkpoint converter: HF safetensors <-> our Orbax checkpoints (`diffusion_gemma.checkpoints`, the
`python -m diffusion_gemma.convert` CLI).

Tiny random references from `hf_reference` (4 layers [s f s f], so the scan stacks 2 repeats per slot, plus a
one-layer vision tower that must be carried through). Proven here: byte-exact round trips (single file and >= 3
shards, bf16 and fp32); transformers loads the export of a modified checkpoint with no missing/unexpected keys
and nothing untied, and its logits equal ours; a LoRA export equals the merged weights (logits against our model
running the adapters); restore straight onto a device mesh; and every error case of the issue.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="reference dependency (pip install -e .[dev])")
transformers = pytest.importorskip("transformers", reason="reference dependency (pip install -e .[dev])")

from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from transformers import DiffusionGemmaForBlockDiffusion  # noqa: E402

from diffusion_gemma import sharding  # noqa: E402
from diffusion_gemma.checkpoints import orbax_io, streaming  # noqa: E402
from diffusion_gemma.checkpoints.export import export_hf, export_model  # noqa: E402
from diffusion_gemma.checkpoints.hf import load_hf  # noqa: E402
from diffusion_gemma.checkpoints.hf_keys import tensor_mappings  # noqa: E402
from diffusion_gemma.checkpoints.safetensors_dir import (INDEX_FILE, CheckpointError, SafetensorsDir,  # noqa: E402
                                                         parse_size, plan_shards, entry)
from diffusion_gemma.config import FULL, SLIDING  # noqa: E402
from diffusion_gemma.model.lora import LoRA, lora_delta  # noqa: E402
from hf_reference import make_reference, reference_forward  # noqa: E402

RTOL = ATOL = 1e-5
REFERENCE = dict(seed=5, layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL])
# Non-weight files a released checkpoint has; a pickle file that must never be read nor carried.
PASSTHROUGH = {"tokenizer.json": '{"model": {"type": "BPE"}}', "tokenizer_config.json": '{"pad_token": "<pad>"}',
               "chat_template.jinja": "{{ bos_token }}{% for m in messages %}<|turn>{{ m.role }}\n{% endfor %}"}
PICKLE_FILE = "training_args.bin"


def _add_passthrough(hf_dir: str) -> None:
    for name, text in PASSTHROUGH.items():
        with open(os.path.join(hf_dir, name), "w") as f:
            f.write(text)
    with open(os.path.join(hf_dir, PICKLE_FILE), "wb") as f:
        f.write(b"\x80\x04not really a pickle")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def sources(work):
    """{name: (torch model, HF dir)}: fp32 and bf16, one file and >= 3 shards."""
    model, fp32_single = make_reference(str(work / "fp32_single"), **REFERENCE)
    out = {"fp32_single": (model, fp32_single)}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, torch_model, shard_size in (("fp32_sharded", model, "300KB"), ("bf16_single", bf16, None),
                                          ("bf16_sharded", bf16, "150KB")):
        path = str(work / name)
        kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
        torch_model.save_pretrained(path, **kwargs)
        out[name] = (torch_model, path)
    for _, path in out.values():
        _add_passthrough(path)
    return out


@pytest.fixture(scope="module")
def ckpt(sources, work):
    """The fp32 single-file reference imported once."""
    path = str(work / "ckpt_fp32")
    streaming.import_hf(sources["fp32_single"][1], path, progress=False)
    return path


def _assert_same_tensors(expected_dir: str, actual_dir: str) -> None:
    with SafetensorsDir(expected_dir) as expected, SafetensorsDir(actual_dir) as actual:
        assert sorted(expected.keys()) == sorted(actual.keys())
        for key in expected.keys():
            a, b = expected.info(key), actual.info(key)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            assert expected.read(key).tobytes() == actual.read(key).tobytes(), key


def _json(path):
    with open(path) as f:
        return json.load(f)


def _shards(hf_dir: str) -> int:
    return len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")])


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["fp32_single", "fp32_sharded", "bf16_single", "bf16_sharded"])
def test_round_trip_is_byte_exact(sources, work, name):
    """HF -> Orbax -> HF reproduces every tensor (vision tower included) byte for byte in its dtype, and the
    config, generation config and tokenizer files; sharded inputs give sharded outputs with an index."""
    _, hf_dir = sources[name]
    sharded = "sharded" in name
    if sharded:
        assert _shards(hf_dir) >= 3
    ckpt_dir, out = str(work / f"rt_{name}"), str(work / f"rt_{name}_hf")
    streaming.import_hf(hf_dir, ckpt_dir, progress=False)
    config = json.loads(open(os.path.join(ckpt_dir, orbax_io.MODEL_CONFIG_FILE)).read())
    assert config["param_dtype"] == ("bfloat16" if "bf16" in name else "float32")
    assert not os.path.exists(os.path.join(ckpt_dir, orbax_io.HF_SUBDIR, PICKLE_FILE))
    export_hf(ckpt_dir, out, max_shard_size="300KB" if sharded else "5GB", progress=False)
    _assert_same_tensors(hf_dir, out)
    assert (_shards(out) >= 3) == sharded and os.path.exists(os.path.join(out, INDEX_FILE)) == sharded
    assert _json(os.path.join(out, "config.json")) == _json(os.path.join(hf_dir, "config.json"))
    assert _json(os.path.join(out, "generation_config.json")) == _json(os.path.join(hf_dir, "generation_config.json"))
    for file_name in PASSTHROUGH:
        assert open(os.path.join(out, file_name)).read() == PASSTHROUGH[file_name]
    assert not os.path.exists(os.path.join(out, PICKLE_FILE))
    if sharded:  # the official safetensors reader agrees with ours, bf16 included
        index = _json(os.path.join(out, INDEX_FILE))
        first = sorted(set(index["weight_map"].values()))[0]
        tensors = torch_load_file(os.path.join(out, first))
        with SafetensorsDir(out) as ours:
            for key, tensor in tensors.items():
                assert tensor.view(torch.uint8).numpy().tobytes() == ours.read(key).tobytes()


def test_bf16_stored_as_fp32_round_trips_exactly(sources, work):
    """--dtype=float32 on a bf16 checkpoint: the export goes back to the declared bf16, bit for bit."""
    _, hf_dir = sources["bf16_single"]
    ckpt_dir, out = str(work / "bf16_as_fp32"), str(work / "bf16_as_fp32_hf")
    streaming.import_hf(hf_dir, ckpt_dir, dtype="float32", progress=False)
    reader = orbax_io.ParamReader(os.path.join(ckpt_dir, orbax_io.PARAMS_ITEM))
    assert reader.dtype(("embedder", "embedding")) == np.float32
    export_hf(ckpt_dir, out, progress=False)
    _assert_same_tensors(hf_dir, out)


def test_mixed_dtypes_come_back_as_they_were(sources, work):
    """A checkpoint whose layer scalars are fp32 and everything else bf16: each tensor returns in its own dtype,
    also after storing everything as fp32."""
    _, hf_dir = sources["bf16_single"]
    mixed = shutil.copytree(hf_dir, work / "mixed")
    tensors = torch_load_file(str(mixed / "model.safetensors"))
    tensors = {k: v.float() if k.endswith("layer_scalar") else v for k, v in tensors.items()}
    from safetensors.torch import save_file as torch_save_file

    torch_save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    for dtype in (None, "float32"):
        ckpt_dir, out = str(work / f"mixed_{dtype}"), str(work / f"mixed_{dtype}_hf")
        streaming.import_hf(str(mixed), ckpt_dir, dtype=dtype, progress=False)
        export_hf(ckpt_dir, out, progress=False)
        _assert_same_tensors(str(mixed), out)
        assert _json(os.path.join(out, "config.json")) == _json(os.path.join(hf_dir, "config.json"))


@pytest.mark.slow
def test_cli_round_trip_and_refusals(sources, work):
    """`python -m diffusion_gemma.convert`: both sub-commands, an existing output refused without --overwrite
    (exit 1, message on stderr), and flags of the other sub-command rejected."""
    _, hf_dir = sources["bf16_sharded"]
    ckpt_dir, out = str(work / "cli_ckpt"), str(work / "cli_hf")
    cli = [sys.executable, "-m", "diffusion_gemma.convert"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*args):
        return subprocess.run(cli + list(args), capture_output=True, text=True, env=env, cwd=os.getcwd())

    result = run("import-hf", f"--hf_dir={hf_dir}", f"--output={ckpt_dir}", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert "MB/s" in result.stdout
    result = run("export-hf", f"--checkpoint={ckpt_dir}", f"--output={out}", "--max_shard_size=300KB", "--noprogress")
    assert result.returncode == 0, result.stderr
    _assert_same_tensors(hf_dir, out)
    result = run("import-hf", f"--hf_dir={hf_dir}", f"--output={ckpt_dir}", "--noprogress")
    assert result.returncode == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    result = run("export-hf", f"--hf_dir={hf_dir}", f"--checkpoint={ckpt_dir}", f"--output={out}2")
    assert result.returncode == 2 and "--hf_dir does not apply to export-hf" in result.stderr


# ---------------------------------------------------------------------------------- transformers loads exports
def _load_torch(hf_dir: str):
    """from_pretrained with eager attention; returns (model, loading info, transformers warnings)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(hf_dir, output_loading_info=True,
                                                                      attn_implementation="eager")
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, [r.getMessage() for r in records]


def _assert_clean_load(hf_dir: str):
    model, info, warnings = _load_torch(hf_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not any("tie" in w for w in warnings), warnings
    encoder, decoder = model.model.encoder.language_model, model.model.decoder
    assert encoder.layers[1].self_attn.q_proj.weight is decoder.layers[1].self_attn.q_proj.weight
    assert model.get_output_embeddings().weight is decoder.embed_tokens.weight
    return model


def _inputs(seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (2, 11)), rng.integers(0, vocab, (2, 8))


@nnx.jit
def _forward(model, ids, canvas):
    return model(ids, canvas)


def _our_logits(model, ids, canvas):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(canvas)))


def test_export_of_trained_checkpoint_matches_transformers(ckpt, sources, work):
    """A modified ("trained") model saved with our writer exports to a directory that transformers loads cleanly
    and whose logits equal ours; exporting the in-memory model gives the same bytes."""
    model = orbax_io.load_model(ckpt)
    rng = np.random.default_rng(0)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(variable.get_value())
        noise = rng.standard_normal(value.shape).astype(value.dtype)
        variable.set_value(jnp.asarray(value + 0.05 * np.abs(value).mean() * noise))
    trained, out, direct = str(work / "trained"), str(work / "trained_hf"), str(work / "trained_direct_hf")
    streaming.save_model(model, trained, hf_dir=ckpt)
    export_hf(trained, out, progress=False)
    export_model(model, direct, base_hf_dir=sources["fp32_single"][1])
    _assert_same_tensors(out, direct)
    torch_model = _assert_clean_load(out)
    ids, canvas = _inputs(1, model.config.vocab_size)
    expected, _ = reference_forward(torch_model, ids, canvas)
    original, _ = reference_forward(sources["fp32_single"][0], ids, canvas)
    assert not np.allclose(expected, original, rtol=RTOL, atol=ATOL)  # the modification is visible
    np.testing.assert_allclose(_our_logits(model, ids, canvas), expected, rtol=RTOL, atol=ATOL)


def _attach_lora(model, seed: int) -> None:
    """Adapters on attention (q, o), the dense MLP (down) and the grouped experts (gate_up, batch dim = experts),
    with random a and b (b is zero at init), stacked over the scan repeats like their kernels."""
    rng = np.random.default_rng(seed)
    repeats = model.config.scan_repeats
    for block in model.blocks:
        for module, name, batch_dims, in_dims in ((block.attn, "q_proj", 0, 1), (block.attn, "o_proj", 0, 2),
                                                  (block.mlp, "down_proj", 0, 1), (block.moe, "gate_up_proj", 1, 1)):
            kernel = getattr(module, name)[...]
            adapter = LoRA(tuple(kernel.shape[1:]), batch_dims=batch_dims, in_dims=in_dims, rank=3, alpha=6.0,
                           rngs=nnx.Rngs(0))
            for part, std in (("a", 0.3), ("b", 0.05)):
                shape = (repeats,) + tuple(getattr(adapter, part)[...].shape)
                setattr(adapter, part, nnx.LoRAParam(jnp.asarray(std * rng.standard_normal(shape), jnp.float32)))
            setattr(module, f"{name}_lora", adapter)


def test_lora_export_equals_merged_weights(ckpt, sources, work):
    """A checkpoint with LoRA adapters: refused without merge_lora; merged, transformers' logits equal our model
    running the adapters, and each exported kernel is W + scale * a @ b."""
    model = orbax_io.load_model(ckpt)
    ids, canvas = _inputs(2, model.config.vocab_size)
    _attach_lora(model, seed=3)
    lora_logits = _our_logits(model, ids, canvas)
    lora_ckpt, out = str(work / "lora"), str(work / "lora_hf")
    streaming.save_model(model, lora_ckpt, hf_dir=ckpt)
    meta = _json(os.path.join(lora_ckpt, orbax_io.LORA_FILE))
    assert meta["blocks/1/moe/gate_up_proj_lora"] == {"scale": 2.0, "batch_dims": 1, "rank": 3}
    with pytest.raises(CheckpointError, match="merge_lora"):
        export_hf(lora_ckpt, out, progress=False)
    assert not os.path.exists(out)
    export_hf(lora_ckpt, out, merge_lora=True, progress=False)
    torch_model = _assert_clean_load(out)
    expected, _ = reference_forward(torch_model, ids, canvas)
    base, _ = reference_forward(sources["fp32_single"][0], ids, canvas)
    assert not np.allclose(expected, base, rtol=RTOL, atol=ATOL)  # the adapters change the model
    np.testing.assert_allclose(lora_logits, expected, rtol=RTOL, atol=ATOL)
    # Layer 3 = slot 1, repeat 1: the exported q_proj and expert gate_up are the merged kernels.
    mappings = {m.hf_key: m for m in tensor_mappings(model.config)}
    with SafetensorsDir(out) as exported:
        for key, module, name, batch_dims in (
                ("model.decoder.layers.3.self_attn.q_proj.weight", model.blocks[1].attn, "q_proj", 0),
                ("model.decoder.layers.3.experts.gate_up_proj", model.blocks[1].moe, "gate_up_proj", 1)):
            adapter = getattr(module, f"{name}_lora")
            merged = getattr(module, name)[...][1] + lora_delta(adapter.a[...][1], adapter.b[...][1], 2.0, batch_dims)
            np.testing.assert_array_equal(exported.read(key), mappings[key].to_hf(np.asarray(merged)))


# --------------------------------------------------------------------------------------------------- device mesh
def test_restore_onto_mesh(ckpt, sources):
    """Orbax restore and the HF loader place every parameter straight into its rule-table sharding."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4))
    reference = load_hf(sources["fp32_single"][1])
    expected = dict(nnx.to_flat_state(sharding.state_shardings(reference, mesh)))
    for model in (orbax_io.load_model(ckpt, mesh=mesh), load_hf(sources["fp32_single"][1], mesh=mesh)):
        actual = dict(nnx.to_flat_state(nnx.state(model)))
        for path, variable in nnx.to_flat_state(nnx.state(reference)):
            value = actual[path].get_value()
            assert value.sharding.is_equivalent_to(expected[path].get_value(), value.ndim), path
            np.testing.assert_array_equal(np.asarray(value), np.asarray(variable.get_value()))
    sharded = [v for _, v in nnx.to_flat_state(nnx.state(model)) if len(v.get_value().sharding.device_set) > 1]
    assert sharded


# --------------------------------------------------------------------------------------------------- error cases
def _rewrite(source: str, target: str, *, drop=(), add=None, replace=None) -> str:
    """A copy of an fp32 single-file HF directory with tensors dropped, added or replaced."""
    shutil.copytree(source, target)
    with SafetensorsDir(source) as reader:
        tensors = {k: v for k, v in reader.items() if k not in drop}
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def test_output_exists_overwrite_and_interruption(sources, work, monkeypatch):
    hf_dir = sources["fp32_single"][1]
    output = work / "exists"
    output.mkdir()
    (output / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        streaming.import_hf(hf_dir, str(output), progress=False)
    assert (output / "marker").exists()
    streaming.import_hf(hf_dir, str(output), overwrite=True, progress=False)
    assert not (output / "marker").exists() and (output / orbax_io.PARAMS_ITEM).is_dir()
    with pytest.raises(ValueError, match="the output cannot be one of the inputs"):
        streaming.import_hf(hf_dir, hf_dir, overwrite=True, progress=False)

    # A failure half way leaves neither the output nor a temporary sibling behind.
    reads = {"count": 0}
    original = SafetensorsDir.read_into

    def failing(self, *args):
        reads["count"] += 1
        if reads["count"] == 20:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SafetensorsDir, "read_into", failing)
    for attempt in ("interrupted_import", "interrupted_export"):
        reads["count"] = 0
        with pytest.raises(KeyboardInterrupt):
            if attempt == "interrupted_import":
                streaming.import_hf(hf_dir, str(work / attempt), progress=False)
            else:  # the export's failure comes from the vision tensors' raw copy
                monkeypatch.setattr(streaming, "BLOCK_BYTES", 1024)
                export_hf(str(output), str(work / attempt), progress=False)
        assert not (work / attempt).exists()
        assert not [n for n in os.listdir(work) if n.startswith(f".{attempt}")]


def test_missing_unexpected_and_misshaped_tensors(sources, work):
    hf_dir = sources["fp32_single"][1]
    key = "model.decoder.layers.1.self_attn.q_proj.weight"
    broken = _rewrite(hf_dir, str(work / "missing"), drop=[key])
    with pytest.raises(CheckpointError, match="missing tensor.*layers.1.self_attn.q_proj"):
        streaming.import_hf(broken, str(work / "out_missing"), progress=False)
    for name, extra in (("unexpected", "model.decoder.layers.0.mlp.extra.weight"), ("lm_head", "lm_head.weight"),
                        ("encoder_copy", "model.encoder.language_model.norm.weight")):
        broken = _rewrite(hf_dir, str(work / name), add={extra: np.zeros((4,), np.float32)})
        with pytest.raises(CheckpointError, match=f"unexpected tensor.*{extra}"):
            streaming.import_hf(broken, str(work / f"out_{name}"), progress=False)
    broken = _rewrite(hf_dir, str(work / "misshaped"), replace={key: np.zeros((7, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"q_proj.weight' has shape \(7, 32\).*expects \(64, 32\)"):
        streaming.import_hf(broken, str(work / "out_misshaped"), progress=False)
    for name in ("out_missing", "out_unexpected", "out_misshaped"):
        assert not (work / name).exists()


def test_truncated_corrupt_and_missing_files(sources, work):
    hf_dir = sources["fp32_single"][1]
    truncated = shutil.copytree(hf_dir, work / "truncated")
    path = truncated / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{path}: truncated"):
        streaming.import_hf(str(truncated), str(work / "out_truncated"), progress=False)
    corrupt = shutil.copytree(hf_dir, work / "corrupt")
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{")
    with pytest.raises(CheckpointError, match=f"{corrupt / 'model.safetensors'}: corrupt"):
        streaming.import_hf(str(corrupt), str(work / "out_corrupt"), progress=False)
    sharded = shutil.copytree(sources["bf16_sharded"][1], work / "lost_shard")
    lost = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))[1]
    os.remove(sharded / lost)
    with pytest.raises(CheckpointError, match=f"{sharded / lost}: shard listed in {INDEX_FILE} is missing"):
        streaming.import_hf(str(sharded), str(work / "out_lost"), progress=False)


def test_export_refuses_inconsistent_checkpoints(ckpt, work):
    """Checkpoint leaves are checked against the model config: names and shapes, before anything is written."""
    mismatched = shutil.copytree(ckpt, work / "mismatched")
    config = json.loads((mismatched / orbax_io.MODEL_CONFIG_FILE).read_text())
    config["intermediate_size"] = 40
    (mismatched / orbax_io.MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'blocks/0/mlp/down_proj' has shape \(2, 48, 32\).*\(2, 40, 32\)"):
        export_hf(str(mismatched), str(work / "out_mismatched"), progress=False)

    model = orbax_io.load_model(ckpt)
    variables = orbax_io.model_variables(model)
    for name, drop, add in (("dropped", ("final_norm", "weight"), None),
                            ("extra", None, ("blocks", "0", "attn", "extra"))):
        leaves = {p: orbax_io.array_leaf(lambda r, v=v: np.asarray(v.get_value()) if r is None else
                                         np.asarray(v.get_value()[r]), v.shape, v.dtype, stacked=p[0] == "blocks")
                  for p, v in variables.items() if p != drop}
        if add:
            leaves[add] = orbax_io.array_leaf(lambda r: np.zeros((3,), np.float32), (2, 3), np.float32, stacked=True)
        directory = work / name
        directory.mkdir()
        orbax_io.write_metadata(str(directory), model.config)
        orbax_io.write_params(str(directory / orbax_io.PARAMS_ITEM), leaves)
        expected = "missing parameter.*final_norm/weight" if drop else "unexpected parameter.*blocks/0/attn/extra"
        with pytest.raises(CheckpointError, match=expected):
            export_hf(str(directory), str(work / f"out_{name}"), base_hf_dir=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="missing parameter.*final_norm/weight"):  # without hf/ too
        export_hf(str(work / "dropped"), str(work / "out_no_passthrough"), progress=False)


# ------------------------------------------------------------------------------------------------------- units
def test_shard_planning_and_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("5 parsecs")
    entries = [entry(f"t{i}", "F32", (n,)) for i, n in enumerate((10, 10, 30, 5, 5))]
    assert [[e.key for e in shard] for shard in plan_shards(entries, 80)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_no_pickle_anywhere():
    """The converter reads and writes only safetensors, Orbax (zarr/OCDBT) and JSON."""
    import importlib.util

    import diffusion_gemma.checkpoints as package

    # The CLI is located, not imported: its absl flags would clash with another CLI's in this process.
    cli_file = importlib.util.find_spec("diffusion_gemma.convert").origin
    files = [os.path.join(os.path.dirname(package.__file__), n) for n in os.listdir(os.path.dirname(package.__file__))
             if n.endswith(".py")] + [cli_file]
    for path in files:
        text = open(path).read()
        for needle in ("import pickle", "torch.load", "allow_pickle=True", "np.load("):
            assert needle not in text, (path, needle)


def test_plain_orbax_checkpoint_manager_layout_exports(ckpt, work):
    """What the trainer will write: the parameter state saved by Orbax itself (jax.Array leaves, sharded) under
    a CheckpointManager step, model_config.json and hf/ in the root. The latest step is exported, identically."""
    import orbax.checkpoint as ocp

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4))
    model = orbax_io.load_model(ckpt, mesh=mesh)
    state = orbax_io.nest({path: v.get_value() for path, v in orbax_io.model_variables(model).items()})
    root = work / "manager"
    with ocp.CheckpointManager(str(root)) as manager:
        for step in (3, 7):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state)))
    shutil.copy(os.path.join(ckpt, orbax_io.MODEL_CONFIG_FILE), root)
    shutil.copytree(os.path.join(ckpt, orbax_io.HF_SUBDIR), root / orbax_io.HF_SUBDIR)
    assert orbax_io.locate(str(root)).step_dir == str(root / "7")
    export_hf(str(root), str(work / "manager_hf"), progress=False)
    export_hf(ckpt, str(work / "manager_reference_hf"), progress=False)
    _assert_same_tensors(str(work / "manager_reference_hf"), str(work / "manager_hf"))
