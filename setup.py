"""diffusion_gemma: a JAX/Flax NNX toolkit for fine-tuning and sampling DiffusionGemma."""

from setuptools import find_packages, setup

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
        # Reference-parity tests run the transformers implementation on the CPU build of torch.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=5.23", "torch==2.13.0"],
    },
)
