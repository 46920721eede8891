"""Low-rank adapters on any kernel of the stack, including the grouped expert weights.

Convention (shared by the model, the trainer and the checkpoint exporter): a kernel Param `<name>` of a module
may have a sibling `<name>_lora` (a `LoRA` module) holding `a` [*batch, *in, r] and `b` [*batch, r, *out] as
`nnx.LoRAParam`s. The effective kernel is W + (alpha / r) * a @ b contracted over r, with `batch` axes (e.g. the
expert axis) shared. Stacked layers add one more leading batch axis to W, a and b alike.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
from flax import nnx


def lora_delta(a: jax.Array, b: jax.Array, scale: float, batch_dims: int) -> jax.Array:
    """(scale * a @ b) shaped like the kernel: a [*batch, *in, r], b [*batch, r, *out]."""
    letters = iter(string.ascii_letters)
    batch = "".join(next(letters) for _ in range(batch_dims))
    inputs = "".join(next(letters) for _ in range(a.ndim - batch_dims - 1))
    outputs = "".join(next(letters) for _ in range(b.ndim - batch_dims - 1))
    rank = next(letters)
    spec = f"{batch}{inputs}{rank},{batch}{rank}{outputs}->{batch}{inputs}{outputs}"
    return scale * jnp.einsum(spec, a, b)


class LoRA(nnx.Module):
    """Adapter for one kernel of shape [*batch, *in, *out]; B starts at zero so training starts from W."""

    def __init__(self, kernel_shape: tuple[int, ...], *, batch_dims: int, in_dims: int, rank: int, alpha: float,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.batch_dims = batch_dims
        self.rank = rank
        self.scale = alpha / rank
        batch, rest = kernel_shape[:batch_dims], kernel_shape[batch_dims:]
        in_shape, out_shape = rest[:in_dims], rest[in_dims:]
        fan_in = 1
        for size in in_shape:
            fan_in *= size
        a = jax.random.normal(rngs.params(), (*batch, *in_shape, rank), jnp.float32) / jnp.sqrt(fan_in)
        self.a = nnx.LoRAParam(a.astype(param_dtype))
        self.b = nnx.LoRAParam(jnp.zeros((*batch, rank, *out_shape), param_dtype))

    def delta(self) -> jax.Array:
        return lora_delta(self.a[...], self.b[...], self.scale, self.batch_dims)


def effective_kernel(module: nnx.Module, name: str) -> jax.Array:
    """W, plus the adapter's delta when `<name>_lora` is set on `module`."""
    kernel = getattr(module, name)[...]
    adapter = getattr(module, f"{name}_lora", None)
    if adapter is None:
        return kernel
    return kernel + adapter.delta().astype(kernel.dtype)
