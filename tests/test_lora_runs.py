"""A LoRA training run (configs/gsm8k_lora.py:tiny, one step) is a checkpoint like any other: the loader that
`generate` and the Sudoku evaluator share reads it, `model.init_checkpoint` starts a new run from it and
`export-hf --merge_lora` exports it. Each folds the adapters into their kernels the one way
(`orbax_io.merge_adapters` / `merged_kernel`) and computes what the run's model, adapters live, computes."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma import generate
from diffusion_gemma.checkpoints import loading, orbax_io
from diffusion_gemma.checkpoints.export import export_hf
from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
from diffusion_gemma.data.tokenizer import TOKENIZER_JSON, load_tokenizer
from diffusion_gemma.model.transformer import DiffusionGemma
from diffusion_gemma.training import lora as lora_lib
from diffusion_gemma.training.config import TrainConfig, from_config_dict
from diffusion_gemma.training.trainer import train

from cli_runs import run_flag_main

pytestmark = pytest.mark.slow  # each test reads a trained run (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = ATOL = 1e-5


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gsm8k_lora_tiny(init_checkpoint: str = "") -> TrainConfig:
    """`--config=configs/gsm8k_lora.py:tiny` cut to one step, saved synchronously (the one step moves every
    adapter: with a single step the schedule has no warm-up, and LoRA's b leaves zero)."""
    raw = _load_module(os.path.join("configs", "gsm8k_lora.py"), "gsm8k_lora").get_config("tiny")
    raw.num_steps = 1
    raw.checkpoint.every_steps = 1
    raw.checkpoint.async_save = False
    raw.model.init_checkpoint = init_checkpoint
    return from_config_dict(raw)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(WORKDIR/checkpoints, config) of the tiny LoRA run."""
    config = gsm8k_lora_tiny()
    workdir = str(tmp_path_factory.mktemp("gsm8k_lora_tiny"))
    train(config, workdir, progress=False, devices=jax.devices()[:1])
    return os.path.join(workdir, "checkpoints"), config


def _model_with(checkpoint: str, values: dict, config: TrainConfig | None = None) -> DiffusionGemma:
    """The checkpoint's model (adapters attached as `config` says, else none) holding `values` {path: array}."""
    model = DiffusionGemma(orbax_io.read_model_config(orbax_io.locate(checkpoint)), rngs=nnx.Rngs(0))
    if config is not None:
        lora_lib.apply_lora(model, config.lora.to_lora_config(), nnx.Rngs(1))
    variables = orbax_io.model_variables(model)
    assert set(variables) <= set(values), sorted(set(variables) - set(values))[:3]
    for path, variable in variables.items():
        variable.set_value(jnp.asarray(values[path]))
    return model


def _running_adapters(checkpoint: str, config: TrainConfig) -> DiffusionGemma:
    """The trained model as training ran it: base weights plus live (unmerged) adapters."""
    stored = orbax_io.flatten(orbax_io.restore_params(checkpoint))
    model = _model_with(checkpoint, stored, config)
    assert len(orbax_io.model_variables(model)) == len(stored)  # every stored leaf is in use
    return model


@nnx.jit
def _forward(model, ids, canvas):
    return model(ids, canvas)


def _logits(model: DiffusionGemma) -> np.ndarray:
    rng = np.random.default_rng(0)
    vocab, canvas_length = model.config.vocab_size, model.config.canvas_length
    ids, canvas = rng.integers(0, vocab, (2, 11)), rng.integers(0, vocab, (2, canvas_length))
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(canvas)))


def _adapter_count(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, orbax_io.LORA_FILE)) as f:
        return len(json.load(f))


def test_the_loaders_merge_the_adapters_the_run_trained(lora_run):
    checkpoint, config = lora_run
    stored = orbax_io.flatten(orbax_io.restore_params(checkpoint))
    trained_b = [path for path in stored if orbax_io.is_lora_path(path) and path[-1] == "b"]
    assert len(trained_b) == _adapter_count(checkpoint) > 0
    assert all(np.any(stored[path]) for path in trained_b)  # every adapter moved off its zero start
    live = _logits(_running_adapters(checkpoint, config))
    base_only = _logits(_model_with(checkpoint, stored))
    assert not np.allclose(base_only, live, rtol=RTOL, atol=ATOL)  # so the merge below is not vacuous

    loaded = loading.load(checkpoint=checkpoint)
    assert loaded.merged_adapters == _adapter_count(checkpoint)
    assert orbax_io.lora_metadata(loaded.model) == {}  # merged, not attached
    assert loaded.tokenizer.endswith(os.path.join(orbax_io.TOKENIZER_SUBDIR, TOKENIZER_JSON))
    np.testing.assert_allclose(_logits(loaded.model), live, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_logits(orbax_io.load_model(checkpoint)), live, rtol=RTOL, atol=ATOL)


def _spy_on_the_loader(monkeypatch) -> list[dict]:
    """The keyword arguments of every `loading.load` call from now on."""
    calls, load = [], loading.load
    monkeypatch.setattr(loading, "load", lambda **kwargs: calls.append(kwargs) or load(**kwargs))
    return calls


def test_generate_answers_from_the_run_without_a_tokenizer_flag(lora_run, tmp_path, capsys, monkeypatch):
    checkpoint, config = lora_run
    output = tmp_path / "answers.jsonl"
    argv = ["generate", f"--checkpoint={checkpoint}", "--prompt=how many coins", "--chat", "--max_new_tokens=8",
            "--max_denoising_steps=2", "--fixed_steps", f"--output={output}"]
    calls = _spy_on_the_loader(monkeypatch)
    run_flag_main(generate.main, argv)
    assert [call["checkpoint"] for call in calls] == [checkpoint]
    printed = capsys.readouterr().out
    assert printed.count("tokens per forward") == 1 and "2 denoising steps" in printed
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    tokenizer = load_tokenizer(config.data.tokenizer)  # the run's tokenizer, found in its checkpoints
    assert record["prompt"] == "how many coins" and record["text"] == tokenizer.decode(record["token_ids"])
    assert len(record["token_ids"]) <= 2 * 32 and record["denoising_steps"] == 2


def test_init_checkpoint_starts_a_new_run_from_the_merged_model(lora_run, tmp_path):
    """`--config.model.init_checkpoint=WORKDIR/checkpoints` of the LoRA run: the new run's base weights (frozen
    by its own fresh adapters, so its checkpoint holds the weights it started from) are the merged ones, and
    compute what the first run's model computed with its adapters live."""
    checkpoint, config = lora_run
    workdir = str(tmp_path / "continued")
    result = train(gsm8k_lora_tiny(init_checkpoint=checkpoint), workdir, progress=False, devices=jax.devices()[:1])
    assert result.final_step == 1 and np.isfinite(result.losses).all()
    continued = os.path.join(workdir, "checkpoints")
    stored = orbax_io.flatten(orbax_io.restore_params(continued))
    base = {path: value for path, value in stored.items() if not orbax_io.is_lora_path(path)}
    merged = {path: variable.get_value() for path, variable in
              orbax_io.model_variables(orbax_io.load_model(checkpoint)).items()}
    assert set(base) == set(merged)
    for path, value in merged.items():
        np.testing.assert_allclose(base[path], value, rtol=RTOL, atol=ATOL, err_msg=orbax_io.path_key(path))
    assert _adapter_count(continued) == _adapter_count(checkpoint)  # the new run trains adapters of its own
    np.testing.assert_allclose(_logits(_model_with(continued, base)), _logits(_running_adapters(checkpoint, config)),
                               rtol=RTOL, atol=ATOL)


def test_the_sudoku_evaluator_loads_the_run_through_the_same_loader(lora_run, monkeypatch):
    """experiments/sudoku/evaluate.py takes the run (chat format, the run's tokenizer) with its adapters merged by
    `loading.load`, the function `generate` calls."""
    checkpoint, _ = lora_run
    calls = _spy_on_the_loader(monkeypatch)
    evaluate = _load_module(os.path.join("experiments", "sudoku", "evaluate.py"), "sudoku_evaluate")
    doc = evaluate.run(["evaluate", f"--checkpoint={checkpoint}", "--generate=1", "--steps=1", "--batch_size=1",
                        "--noprogress"])
    assert [call["checkpoint"] for call in calls] == [checkpoint]
    assert doc["format"] == "chat" and doc["model"]["merged_adapters"] == _adapter_count(checkpoint)
    assert doc["sets"][0]["count"] == 1


def test_export_merges_the_adapters_and_transformers_computes_the_same(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="reference dependency (pip install -e .[dev])")
    pytest.importorskip("torch", reason="reference dependency (pip install -e .[dev])")
    from hf_reference import reference_forward

    checkpoint, config = lora_run
    out = str(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="pass --merge_lora"):
        export_hf(checkpoint, out, progress=False)
    export_hf(checkpoint, out, merge_lora=True, progress=False)
    torch_model, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    live = _running_adapters(checkpoint, config)
    rng = np.random.default_rng(0)
    ids, canvas = rng.integers(0, 512, (2, 11)), rng.integers(0, 512, (2, live.config.canvas_length))
    expected, _ = reference_forward(torch_model.eval(), ids, canvas)
    np.testing.assert_allclose(np.asarray(_forward(live, jnp.asarray(ids), jnp.asarray(canvas))), expected,
                               rtol=RTOL, atol=ATOL)
    tokenizer = load_tokenizer(config.data.tokenizer)
    assert load_tokenizer(out).encode("hello world") == tokenizer.encode("hello world")
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world", add_special_tokens=False).input_ids == \
        tokenizer.encode("hello world")
