"""The notebooks in colabs/: every `*.ipynb` there is executed headless on CPU, one test per run, and must finish
without a cell error; every notebook is also checked for its structure (title, Colab badge, install cell, one
"parameters" cell) and for having no stored outputs.

Parameters are overridden papermill-style, without papermill: a code cell assigning the values in `RUNS` is
inserted right after the notebook's cell tagged "parameters" (each name must be assigned there, so a renamed
parameter cannot silently stop being overridden). A notebook not listed in `RUNS` runs once with its defaults.
Each run gets its own temporary working directory, where the executed notebook is saved
(`executed_<name>.ipynb`, outputs included) for inspection.

The kernel is an ipykernel of this interpreter (`sys.executable`), with the repository on PYTHONPATH (so the
notebooks' install cells see the package and install nothing), one CPU device (not conftest's 8), XLA's
cheaper compilation settings (the notebooks run few steps, so compilation dominates) and the test suite's
persistent compilation cache. Needs the `dev` extra (nbclient, nbformat, ipykernel, matplotlib, transformers,
torch). `python -m pytest -q -s tests/test_colabs.py` prints each run's wall time.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # see tests/conftest.py

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (pip install -e .[dev])")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra (pip install -e .[dev])")
pytest.importorskip("ipykernel", reason="notebook tests need the dev extra (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parent.parent
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(path.name for path in COLABS.glob("*.ipynb"))
ORG = "diffusion-gemma"

# Stands for the path of a tiny random HuggingFace checkpoint that transformers writes (fixture `tiny_hf_dir`).
TINY_HF_CHECKPOINT = object()
# {notebook: {run name: parameter overrides}}. Sizes are chosen so that each run takes about a minute on a
# 2-core CPU; the notebooks' own defaults are what a Colab user gets.
RUNS = {
    "quickstart.ipynb": {
        "tiny": {"TINY_OVERRIDES": {"num_layers": 2}, "TEACH_STEPS": 60},
        "hf": {"HF_DIR": TINY_HF_CHECKPOINT},
    },
    "finetune_lora.ipynb": {
        "tiny": {"NUM_STEPS": 3, "MODEL_OVERRIDES": {"num_layers": 2}, "MAX_NEW_TOKENS": 32},
    },
    "sudoku.ipynb": {
        "tiny": {"NUM_STEPS": 3, "MODEL_OVERRIDES": {"num_layers": 2}, "NUM_EVAL_PUZZLES": 2, "DENOISING_STEPS": 4},
    },
}
# Modules a notebook needs beyond the package and matplotlib (every notebook plots or may plot).
REQUIRES = {"convert_checkpoint.ipynb": ("torch", "transformers")}
CELL_TIMEOUT_S = 600
KERNEL_NAME = "diffusion-gemma-test"


def _runs():
    for name in NOTEBOOKS:
        for run, overrides in RUNS.get(name, {"defaults": {}}).items():
            yield pytest.param(name, overrides, id=f"{Path(name).stem}-{run}")


def _load(name: str):
    with open(COLABS / name, encoding="utf-8") as f:
        return nbformat.read(f, as_version=4)


def _parameters_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    assert nb.cells[tagged[0]].cell_type == "code"
    return tagged[0]


def _assigned_names(source: str) -> set[str]:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def _inject(nb, overrides: dict) -> None:
    """Insert a cell assigning `overrides` right after the "parameters" cell (papermill's convention)."""
    index = _parameters_index(nb)
    unknown = sorted(set(overrides) - _assigned_names(nb.cells[index].source))
    assert not unknown, f"overrides {unknown} are not assigned in the notebook's parameters cell"
    if overrides:
        source = "# Parameters injected by tests/test_colabs.py\n" + "\n".join(
            f"{key} = {value!r}" for key, value in overrides.items())
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(index + 1, cell)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_well_formed(name):
    """Title, the Colab badge of this file, an install cell before the parameters, and no stored outputs."""
    nb = _load(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell must be a title"
    badge = f"https://colab.research.google.com/github/{ORG}/diffusion_gemma/blob/main/colabs/{name}"
    assert badge in first.source, f"the title cell must carry the Open in Colab badge ({badge})"
    index = _parameters_index(nb)
    assert any("pip" in cell.source and cell.cell_type == "code" for cell in nb.cells[:index]), \
        "an install cell must come before the parameters"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    stored = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not stored, f"cells {stored} have stored outputs: clear them before committing"


def test_every_listed_notebook_exists():
    assert set(RUNS) | set(REQUIRES) <= set(NOTEBOOKS)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec running this interpreter, whatever `python3` kernels the machine has installed."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(str(kernels / KERNEL_NAME))
    return str(kernels)


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random DiffusionGemma written by transformers, with the bundled tiny tokenizer and sampler settings."""
    pytest.importorskip("torch", reason="the checkpoint is written by transformers (pip install -e .[dev])")
    pytest.importorskip("transformers", reason="the checkpoint is written by transformers (pip install -e .[dev])")
    from hf_reference import FULL, SLIDING, make_reference

    path = str(tmp_path_factory.mktemp("tiny_hf"))
    make_reference(path, seed=1, layers=2, layer_types=[SLIDING, FULL], vocab_size=512, canvas_length=16)
    shutil.copyfile(ROOT / "configs" / "data" / "tiny_tokenizer.json", os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"max_new_tokens": 16, "max_denoising_steps": 8, "eos_token_id": [1], "pad_token_id": 0}, f)
    return path


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    # One CPU device (conftest's XLA_FLAGS ask for 8) and cheaper compilation: LLVM's expensive passes buy speed
    # the notebooks' few steps never recover.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "diffusion_gemma_test_jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    # Tiny torch models on a shared machine: more threads only spin (see tests/hf_reference.py).
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.mark.parametrize("name, overrides", list(_runs()))
def test_notebook_runs(name, overrides, kernel_dir, tmp_path, request, record_property):
    pytest.importorskip("matplotlib", reason="the notebooks plot (pip install -e .[dev])")
    for module in REQUIRES.get(name, ()):
        pytest.importorskip(module, reason=f"{name} needs {module} (pip install -e .[dev])")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    overrides = {key: request.getfixturevalue("tiny_hf_dir") if value is TINY_HF_CHECKPOINT else value
                 for key, value in overrides.items()}
    nb = _load(name)
    _inject(nb, overrides)
    workdir = tmp_path / "work"
    workdir.mkdir()
    manager = AsyncKernelManager(kernel_name=KERNEL_NAME,
                                 kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
    client = nbclient.NotebookClient(nb, km=manager, timeout=CELL_TIMEOUT_S, startup_timeout=300,
                                     extra_arguments=["--InteractiveShell.colors=NoColor"],
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    finally:
        seconds = time.perf_counter() - start
        nbformat.write(nb, str(workdir / f"executed_{name}"))
        record_property("wall_s", round(seconds, 1))
        print(f"\n{request.node.name}: {seconds:.1f} s wall (executed notebook: {workdir / ('executed_' + name)})",
              file=sys.stderr)
