"""A training run's checkpoint is self-contained: it carries its tokenizer, exports to a HuggingFace directory
that transformers loads (from scratch: generated configs and an inert vision tower), and `generate` on a task's
vocabulary points at the task's tool. One tiny run of one step: a Sudoku compact-format model from scratch.
(LoRA runs: tests/test_lora_runs.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="reference dependency (pip install -e .[dev])")
transformers = pytest.importorskip("transformers", reason="reference dependency (pip install -e .[dev])")

from diffusion_gemma.checkpoints import orbax_io  # noqa: E402
from diffusion_gemma.checkpoints.export import INERT_VISION_CONFIG, export_hf  # noqa: E402
from diffusion_gemma.checkpoints.hf_config import model_config_from_hf_dir  # noqa: E402
from diffusion_gemma.checkpoints.safetensors_dir import SafetensorsDir  # noqa: E402
from diffusion_gemma.config import RopeConfig  # noqa: E402
from diffusion_gemma.data.pipeline import DataConfig  # noqa: E402
from diffusion_gemma.tasks.sudoku.formats import TASK, CompactFormat  # noqa: E402
from diffusion_gemma.data.tokenizer import TOKENIZER_JSON, load_tokenizer, vocabulary_task  # noqa: E402
from diffusion_gemma.sampling.sampler import SamplerConfig  # noqa: E402
from diffusion_gemma.sharding import MeshConfig  # noqa: E402
from diffusion_gemma.training import checkpointing  # noqa: E402
from diffusion_gemma.training.config import CheckpointSection, ModelSection, TrainConfig  # noqa: E402
from diffusion_gemma.training.optimizer import OptimizerConfig  # noqa: E402
from diffusion_gemma.training.trainer import train  # noqa: E402

from hf_reference import FULL, make_reference, reference_forward  # noqa: E402

pytestmark = pytest.mark.slow  # see tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "configs", "data", "tiny_tokenizer.json")
RTOL = ATOL = 1e-5
SMALL = dict(num_layers=2, hidden_size=32, intermediate_size=48, num_heads=2, head_dim=8, num_kv_heads=1,
             global_head_dim=16, num_global_kv_heads=1, num_experts=4, top_k=2, moe_intermediate_size=16,
             sliding_window=8)


def _config(model: dict, data: DataConfig) -> TrainConfig:
    """One step on one device: enough to move every trained weight at the least compile time."""
    return TrainConfig(seed=0, num_steps=1, log_every=1, model=ModelSection(preset="tiny", overrides=model),
                       optimizer=OptimizerConfig(learning_rate=1e-2, end_learning_rate=1e-3, warmup_steps=1),
                       data=data, mesh=MeshConfig(data=1, expert=1),
                       checkpoint=CheckpointSection(every_steps=1, keep=1, async_save=False))


@pytest.fixture(scope="module")
def sudoku_run(tmp_path_factory):
    """configs/sudoku.py:row_rope (the default without the cell geometry, which HF cannot carry) in miniature:
    compact format, vocabulary 16, one 81-cell canvas, the row-period rotary on the full layers."""
    model = dict(SMALL, vocab_size=16, canvas_length=81, rope_global=dataclasses.asdict(RopeConfig.first_period(9, 16)))
    data = DataConfig(source="sudoku", seq_length=163, block_size=81, global_batch_size=8, num_synthetic_examples=16,
                      options=dict(format="compact", min_givens=35, max_givens=60))
    workdir = str(tmp_path_factory.mktemp("sudoku_run"))
    train(_config(model, data), workdir, progress=False, devices=jax.devices()[:1])
    return os.path.join(workdir, "checkpoints")


def _load_torch(hf_dir: str):
    model, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        hf_dir, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@nnx.jit
def _forward(model, ids, canvas):
    return model(ids, canvas)


def _inputs(vocab: int, canvas_length: int):
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, (2, 11)), rng.integers(0, vocab, (2, canvas_length))


def _logits_match(model, torch_model, vocab: int, canvas_length: int) -> np.ndarray:
    """Our logits for random inputs, checked against transformers'."""
    ids, canvas = _inputs(vocab, canvas_length)
    expected, _ = reference_forward(torch_model, ids, canvas)
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(canvas)))
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)
    return ours


# --------------------------------------------------------------------------------------------- from scratch
def test_training_run_carries_the_compact_tokenizer(sudoku_run):
    tokenizer_dir = os.path.join(sudoku_run, orbax_io.TOKENIZER_SUBDIR)
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
    assert not os.path.exists(os.path.join(sudoku_run, orbax_io.HF_SUBDIR))  # nothing came from HuggingFace
    assert orbax_io.locate(sudoku_run).tokenizer_file() == os.path.join(tokenizer_dir, TOKENIZER_JSON)
    assert vocabulary_task(tokenizer_dir) == TASK
    tokenizer, fmt = load_tokenizer(tokenizer_dir), CompactFormat()
    puzzle = np.arange(81).reshape(9, 9) % 10
    assert [tokenizer.bos_id] + tokenizer.encode("".join(map(str, puzzle.reshape(-1)))) == fmt.prompt_ids(puzzle)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (fmt.PAD, fmt.EOS, fmt.VOCAB_SIZE)


def test_from_scratch_export_loads_in_transformers(sudoku_run, tmp_path):
    """No hf/ passthrough: config.json from the model config (with the inert vision tower), the sampler's
    generation config and the run's tokenizer; transformers' logits equal ours, its tokenizer encodes a puzzle
    to the compact ids."""
    out = str(tmp_path / "hf")
    export_hf(sudoku_run, out, progress=False)
    model = orbax_io.load_model(sudoku_run)
    assert json.load(open(os.path.join(out, "config.json")))["vision_config"] == INERT_VISION_CONFIG
    with SafetensorsDir(out) as exported:
        vision = [key for key in exported.keys() if "vision" in key]
        assert len(vision) == 3 and all(not exported.read(key).any() for key in vision)
    torch_model = _load_torch(out)
    _logits_match(model, torch_model, 16, 81)
    defaults = SamplerConfig()
    # 256 new tokens (the sampler's default) rounded up to whole 81-cell canvases.
    assert SamplerConfig.from_generation_config(out) == defaults.replace(
        eos_token_ids=model.config.eos_token_ids, pad_token_id=model.config.pad_token_id, max_new_tokens=4 * 81)
    generation = torch_model.generation_config
    assert (generation.max_denoising_steps, generation.sampler_config.entropy_bound, generation.eos_token_id) == (
        defaults.max_denoising_steps, defaults.entropy_bound, list(model.config.eos_token_ids))
    puzzle = np.arange(81).reshape(9, 9) % 10
    for tokenizer_class in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf_tokenizer = tokenizer_class.from_pretrained(out)
        ids = hf_tokenizer(" ".join(map(str, puzzle.reshape(-1))), add_special_tokens=False).input_ids
        assert [hf_tokenizer.bos_token_id] + ids == CompactFormat().prompt_ids(puzzle)
        assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id) == (CompactFormat.PAD, CompactFormat.EOS)


def test_generate_on_the_sudoku_vocabulary_points_at_the_sudoku_tool(sudoku_run):
    """The real entry point: one line naming the task's tool, exit 1, no traceback."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "diffusion_gemma.generate", f"--checkpoint={sudoku_run}",
                             "--prompt=530070000"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("generate:")]
    assert lines == [f"generate: error: this model's vocabulary is the sudoku task's compact format, not text; use "
                     f"experiments/sudoku/evaluate.py --checkpoint={sudoku_run}"], result.stderr


# ------------------------------------------------------------------------------------- starting from HF weights
def test_checkpointer_keeps_what_the_initial_hf_weights_came_with(tmp_path):
    """A run from an HF directory keeps its passthrough (non-weight files, vision tower byte for byte) and its
    tokenizer files; a resumed run's checkpointer leaves both as the first start wrote them."""
    hf_dir = str(tmp_path / "hf_model")
    make_reference(hf_dir, seed=1, layers=1, layer_types=[FULL], vocab_size=512)
    companions = {"tokenizer_config.json": '{"tokenizer_class": "GemmaTokenizer"}', "chat_template.jinja": "{{ x }}"}
    for name, text in dict(companions, **{TOKENIZER_JSON: open(TINY_TOKENIZER).read()}).items():
        (tmp_path / "hf_model" / name).write_text(text)
    root = str(tmp_path / "checkpoints")

    def checkpointer():
        return checkpointing.TrainCheckpointer(root, model_config=model_config_from_hf_dir(hf_dir), lora=None, keep=1,
                                               async_save=False, hf_source=hf_dir, tokenizer=load_tokenizer(hf_dir))

    checkpointer().close()
    passthrough, tokenizer_dir = os.path.join(root, orbax_io.HF_SUBDIR), os.path.join(root, orbax_io.TOKENIZER_SUBDIR)
    with SafetensorsDir(hf_dir) as original, SafetensorsDir(os.path.join(passthrough, orbax_io.EXTRA_TENSORS_FILE)) \
            as kept:
        vision = [key for key in original.keys() if "vision" in key]
        assert vision and sorted(kept.keys()) == sorted(vision)
        assert all(kept.read(key).tobytes() == original.read(key).tobytes() for key in vision)
    assert open(os.path.join(passthrough, "config.json")).read() == open(os.path.join(hf_dir, "config.json")).read()
    for name, text in companions.items():
        assert open(os.path.join(tokenizer_dir, name)).read() == text
    # tokenizer/ is the run's own: it wins over the copy in hf/.
    assert orbax_io.CheckpointDir(root, root).tokenizer_file() == os.path.join(tokenizer_dir, TOKENIZER_JSON)
    with open(os.path.join(tokenizer_dir, "chat_template.jinja"), "w") as f:
        f.write("changed")
    checkpointer().close()
    assert open(os.path.join(tokenizer_dir, "chat_template.jinja")).read() == "changed"
    assert not [name for name in os.listdir(root) if "partial" in name]


def test_a_standalone_tokenizer_file_gets_a_config_transformers_reads(tmp_path):
    """data.tokenizer as a lone file: copied as tokenizer.json (its neighbours are not its own) with a
    tokenizer_config.json naming its special tokens."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    tokenizer.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    assert open(tmp_path / "tokenizer.json").read() == open(TINY_TOKENIZER).read()
    assert vocabulary_task(str(tmp_path)) is None
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
