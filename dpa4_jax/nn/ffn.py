"""A4: the equivariant feed-forward network with a Lebedev-grid non-linearity (paper Eq. 31-38)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.nn.linear import DegreeLinear, FocusLinear
from dpa4_jax.so3.lebedev import LebedevGrid

Dtype = Any


class GridFFN(nn.Module):
    """``(N, (L+1)^2, C) -> (N, (L+1)^2, C)``: degree-wise linear to two halves ``a``, ``b``
    of ``hidden`` channels, their product on the Lebedev grid, a scalar gate, degree-wise linear back.

    * grid product: ``from_grid(to_grid(a) * to_grid(b))``, exactly equivariant
      because the rule integrates degree 3L exactly (no pointwise non-linearity on
      the grid in the reference: a bilinear product);
    * every coefficient is gated by ``sigmoid(W [a_0, b_0])`` (W init N(0, 0.01));
    * the l = 0 channel also gets ``silu(a_0) * b_0`` (a SwiGLU of the scalars);
    * the output linear is zero-initialised (the block starts as the identity);
    * ``mlp_bias`` adds zero-initialised biases to both linears (l = 0) and to the gate.
    """

    lmax: int
    hidden: int
    mlp_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pd = dict(param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, use_bias=self.mlp_bias)
        channels = x.shape[-1]
        h = DegreeLinear(self.lmax, 2 * self.hidden, name="so3_linear_1", **pd)(x)
        a, b = h[..., :self.hidden], h[..., self.hidden:]
        to_grid, from_grid = (jnp.asarray(m, x.dtype) for m in LebedevGrid.for_product(self.lmax).projections(self.lmax))
        product = jnp.einsum("dk,nkc->ndc", from_grid,
                             jnp.einsum("kd,ndc->nkc", to_grid, a) * jnp.einsum("kd,ndc->nkc", to_grid, b))
        scalars = jnp.concatenate([a[:, 0], b[:, 0]], axis=-1)  # (N, 2 hidden)
        gate_linear = FocusLinear(self.hidden, init_std=0.01, name="scalar_gate", **pd)
        gate = jax.nn.sigmoid(gate_linear(scalars[:, None])[:, 0])
        y = product * gate[:, None, :]
        y = y.at[:, 0].add(jax.nn.silu(a[:, 0]) * b[:, 0])
        return DegreeLinear(self.lmax, channels, zero_init=True, name="so3_linear_2", **pd)(y)


class ScalarGLU(nn.Module):
    """Read-out FFN on the l = 0 channel: ``W2 (value * silu(gate))``, ``[value | gate] = W1 x``.

    Weights keep the reference's degree-wise shapes ``(1, C, 2H)`` and ``(1, H, C)``;
    the output weight is zero-initialised. ``mlp_bias`` adds zero-initialised biases to both.
    """

    hidden: int
    mlp_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``(N, C) -> (N, C)``."""
        pd = dict(param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, use_bias=self.mlp_bias)
        h = DegreeLinear(0, 2 * self.hidden, name="so3_linear_1", **pd)(x[:, None])[:, 0]
        y = h[:, :self.hidden] * jax.nn.silu(h[:, self.hidden:])
        return DegreeLinear(0, x.shape[-1], zero_init=True, name="so3_linear_2", **pd)(y[:, None])[:, 0]
