"""A4: the equivariant feed-forward network with a grid non-linearity (paper Eq. 31-38), and the read-out FFN."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.nn.grid import GridActivation, GridSpec, gate_and_swiglu
from dpa4_jax.nn.linear import DegreeLinear, FocusLinear

Dtype = Any


class GridFFN(nn.Module):
    """``(N, (L+1)^2, C) -> (N, (L+1)^2, C)``: degree-wise linear to two fields ``a``, ``b``
    of ``hidden`` channels (and ``K`` grid frames each), a grid operation, a scalar gate,
    degree-wise linear back.

    * grid operation (``grid``): by default the paper's bilinear product on the Lebedev
      grid, ``from_grid(to_grid(a) * to_grid(b))``, exactly equivariant because the rule
      integrates degree 3L exactly (no pointwise non-linearity on the grid in the
      reference); the reference's ``grid_mlp``/``grid_branch`` operations and its SO(3)
      grid (``ffn_so3_grid``, ``K = 2 kmax + 1`` frames) are the alternatives (``nn.grid``);
    * every coefficient is gated by ``sigmoid(W [a_0, b_0])`` (W init N(0, 0.01));
    * the l = 0 channel also gets ``silu(a_0) * b_0`` (a SwiGLU of the scalars);
    * the output linear is zero-initialised (the block starts as the identity);
    * ``mlp_bias`` adds zero-initialised biases to both linears (l = 0) and to the gate.
    """

    lmax: int
    hidden: int
    mlp_bias: bool = False
    grid: GridSpec = GridSpec()
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pd = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        n_node, dim, channels = x.shape
        projection = self.grid.projection(self.lmax)
        fields = projection.n_frames * self.hidden
        h = DegreeLinear(self.lmax, 2 * fields, name="so3_linear_1", use_bias=self.mlp_bias, **pd)(x)
        a, b = (f.reshape(n_node, dim, -1, self.hidden) for f in (h[..., :fields], h[..., fields:]))  # (N, D, K, H)
        scalars = jnp.concatenate([a[:, 0, 0], b[:, 0, 0]], axis=-1)  # (N, 2 hidden)
        y = GridActivation(self.grid, name="act", **pd)(a, b, scalars, projection)
        gate = FocusLinear(self.hidden, init_std=0.01, use_bias=self.mlp_bias, name="scalar_gate", **pd)
        y = gate_and_swiglu(y, a[:, 0, 0], b[:, 0, 0], gate(scalars[:, None])[:, 0])
        return DegreeLinear(self.lmax, channels, zero_init=True, use_bias=self.mlp_bias, name="so3_linear_2", **pd)(
            y.reshape(n_node, dim, fields))


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
