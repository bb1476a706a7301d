"""RMS normalisations: plain, per-focus scalar, and equivariant (paper Eq. 65-66)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpa4_jax.so3.layout import degree_of_packed

Dtype = Any


class RMSNorm(nn.Module):
    """``x / rms(x) * adam_scale`` over the last axis; ``adam_scale`` has shape ``(C,)``."""

    eps: float = 1e-7
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("adam_scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class ScalarRMSNorm(nn.Module):
    """RMS norm of per-focus scalars ``(..., F, C)``; ``adam_scale`` has shape ``(F, C)``."""

    n_focus: int = 1
    eps: float = 1e-7
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("adam_scale", nn.initializers.ones, (self.n_focus, x.shape[-1]), self.param_dtype)
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class EquivariantRMSNorm(nn.Module):
    """Equivariant RMSNorm of node features ``(N, (L+1)^2, C)`` (paper Eq. 65-66).

    The l = 0 channels are mean-centred; one RMS per node weighs every degree
    equally (weight ``1/((2l+1)(L+1)C)`` per coefficient), so it is rotation
    invariant; then a per-degree, per-channel scale and an l = 0 bias.
    Shapes follow the reference: ``adam_scale (L+1, 1, C)``, ``bias (1, C)``.
    """

    lmax: int
    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("adam_scale", nn.initializers.ones, (self.lmax + 1, 1, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (1, c), self.param_dtype)
        degree = degree_of_packed(self.lmax)
        weight = 1.0 / ((2 * degree + 1) * (self.lmax + 1) * c)
        x0 = x[:, :1] - jnp.mean(x[:, :1], axis=-1, keepdims=True)
        x = jnp.concatenate([x0, x[:, 1:]], axis=1)
        mean_square = jnp.einsum("ndc,d->n", x * x, jnp.asarray(weight, x.dtype))
        x = x / jnp.sqrt(mean_square + self.eps)[:, None, None]
        x = x * scale[degree, 0]
        return x.at[:, 0].add(bias[0])
