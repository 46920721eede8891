"""configs/sudoku.py:finetune_tiny end to end on a tiny HuggingFace checkpoint: the 26B LoRA recipe's code path
(HF import, LoRA on every linear layer incl. the experts, chat format with the checkpoint's tokenizer,
expert-parallel mesh over the 8 CPU devices), then the trained checkpoint evaluated through evaluate.py with
both decoders."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch", reason="builds the HF checkpoint with transformers (pip install -e .[dev])")
pytest.importorskip("transformers", reason="builds the HF checkpoint with transformers (pip install -e .[dev])")

from diffusion_gemma import sharding  # noqa: E402
from diffusion_gemma.checkpoints import orbax_io  # noqa: E402
from diffusion_gemma.checkpoints.hf import load_hf  # noqa: E402
from diffusion_gemma.training import lora as lora_lib  # noqa: E402
from diffusion_gemma.training import setup as train_setup, trainer  # noqa: E402
from diffusion_gemma.training.config import from_config_dict  # noqa: E402
from hf_reference import FULL, make_reference  # noqa: E402
from test_sudoku_eval import TINY_TOKENIZER, load_script, load_sudoku_config  # noqa: E402

pytestmark = pytest.mark.slow  # see tests/conftest.py

CANVAS = 96  # = finetune_tiny's data.block_size


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """One full-attention layer, 8 experts (one per device on the 'expert' axis), the tiny tokenizer's ids."""
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    make_reference(path, seed=5, layers=1, layer_types=[FULL], canvas_length=CANVAS, vocab_size=512, num_experts=8,
                   top_k=2, max_position_embeddings=512)
    shutil.copy(TINY_TOKENIZER, os.path.join(path, "tokenizer.json"))
    return path


def finetune_config(hf_dir: str, **changes):
    raw = load_sudoku_config("finetune_tiny")
    raw.model.init_hf_dir = hf_dir
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(raw[section] if section else raw, name, value)
    return from_config_dict(raw)


def _logits(model, input_ids, canvas):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i, c: nnx.merge(graphdef, s)(i, c))(state, input_ids, canvas)


def test_finetune_starts_from_the_imported_hf_weights(hf_dir):
    """The trainer's model at step 0 (HF import onto the expert-parallel mesh + zero-initialised LoRA on every
    linear layer) computes exactly what load_hf's model does."""
    config = finetune_config(hf_dir)
    assert config.lora.enabled and set(config.lora.targets) == set(lora_lib.ALL_LINEAR_TARGETS + lora_lib.EXPERTS)
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(5, 300, (8, 40)), jnp.int32)
    canvas = jnp.asarray(rng.integers(5, 300, (8, CANVAS)), jnp.int32)
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "expert": 8}
    with jax.set_mesh(mesh):
        model = train_setup.build_model(config, train_setup.model_config_for(config), mesh)
        assert model.config.moe_impl == "expert_parallel"
        assert len(orbax_io.lora_metadata(model)) == 12  # q, k, o, 3 MLP, router, 2 expert, 3 self-conditioning
        ours = np.asarray(_logits(model, input_ids, canvas))
    reference = np.asarray(_logits(load_hf(hf_dir), input_ids, canvas))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_finetune_tiny_trains_lora_and_evaluates_with_both_decoders(hf_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    # One step at the full learning rate (no warm-up), so the adapters move; no periodic evaluation (the
    # evaluate CLI below covers the chat-format sampler).
    config = finetune_config(hf_dir, num_steps=1, **{"optimizer.warmup_steps": 0, "evaluation.every_steps": 0})
    result = trainer.train(config, workdir, progress=False)
    assert result.final_step == 1 and np.isfinite(result.losses[0])

    # The checkpoint's base weights are the HF weights, untouched; the adapters trained.
    stored = orbax_io.flatten(orbax_io.restore_params(os.path.join(workdir, "checkpoints")))
    imported = {path: np.asarray(v.get_value()) for path, v in orbax_io.model_variables(load_hf(hf_dir)).items()}
    assert set(imported) == {p for p in stored if not orbax_io.is_lora_path(p)}
    for path, value in imported.items():
        np.testing.assert_array_equal(stored[path], value, err_msg=orbax_io.path_key(path))
    trained_b = [p for p in stored if p[-1] == "b" and orbax_io.is_lora_path(p) and np.any(stored[p])]
    assert any("q_proj_lora" in p for p in trained_b) and any("gate_up_proj_lora" in p for p in trained_b)

    evaluate = load_script("evaluate")
    argv = ["evaluate", f"--checkpoint={os.path.join(workdir, 'checkpoints')}",
            f"--tokenizer={os.path.join(hf_dir, 'tokenizer.json')}", "--generate=4", "--min_givens=30",
            "--max_givens=45", "--batch_size=4", "--steps=4", "--noprogress"]
    for decoder in ("diffusion", "autoregressive"):
        doc = evaluate.run(argv + [f"--decoder={decoder}"])
        assert doc["format"] == "chat" and doc["model"]["merged_adapters"] == 12
        (scores,) = doc["sets"]
        assert scores["count"] == 4 and scores["solutions"] is None and scores["name"].startswith("generated-4")
        overall = scores["report"]["all"]
        assert 0.0 <= overall["blank_cell_accuracy"] <= 1.0
        if decoder == "diffusion":
            # 4 LoRA steps on a random base: never confident, so every puzzle runs the whole 4-step budget.
            assert overall["mean_forwards"] == 4.0 and doc["sampler"]["max_new_tokens"] == CANVAS
            diffusion_sets = doc["sets"]
        else:
            # One forward per answer token, up to the chat answer's 83 tokens (no early stop turn-end from this model).
            assert overall["mean_forwards"] == 83.0 and overall["mean_tokens_per_forward"] == 1.0
    assert "(autoregressive," in capsys.readouterr().out
    # The run carries its tokenizer (copied from the HF dir at the start), so --tokenizer is not needed.
    untokenized = evaluate.run([a for a in argv if not a.startswith("--tokenizer")] + ["--decoder=diffusion"])
    assert [s["report"] for s in untokenized["sets"]] == [s["report"] for s in diffusion_sets]
