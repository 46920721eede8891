"""diffusion_gemma: a JAX/Flax NNX toolkit for fine-tuning and sampling DiffusionGemma."""

from setuptools import find_packages, setup

# The JAX release the test suite and the TPU extra pin (libtpu must match it exactly).
JAX_VERSION = "0.10.2"

setup(
    name="diffusion_gemma",
    version="0.1.0",
    description="JAX/Flax NNX toolkit for fine-tuning and sampling DiffusionGemma (block-diffusion Gemma 4 MoE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffusion_gemma", "diffusion_gemma.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "ml-collections>=1.1",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "numpy>=2.0",
        "ml_dtypes>=0.5",
        "safetensors>=0.6",
        "tqdm>=4.66",
    "tensorboardX>=2.6",
    ],
    extras_require={
        # Reference-parity tests run the transformers implementation on the CPU build of torch; the Sudoku plot
        # tests need matplotlib; tests/test_colabs.py executes the notebooks with nbclient on an ipykernel.
        # tests/test_aot.py compiles for TPU topologies on the CPU: libtpu, in the version this JAX names.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "transformers==5.25.0", "torch==2.13.0", "matplotlib>=3.8",
                "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", f"jax[tpu]=={JAX_VERSION}"],
        # `python -m diffusion_gemma.aot` (compile for a TPU slice on any host) and running on TPUs: the libtpu
        # that JAX's own `tpu` extra pins for this JAX version.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # experiments/sudoku/plots.py (diffusion_gemma.tasks.sudoku.plotting).
        "plots": ["matplotlib>=3.8"],
        # What the notebooks in colabs/ import besides this package (Colab preinstalls them): plots, and
        # transformers + torch to write and check checkpoints in convert_checkpoint.ipynb.
        "notebooks": ["matplotlib>=3.8", "transformers>=5.23", "torch"],
    },
)
