"""Grid non-linearities: point-wise operations on S2 or SO(3) grid fields (paper Eq. 31-38, and the
reference's extensions: ``grid_mlp``, ``grid_branch``, ``ffn_so3_grid``, ``message_node_so3``).

Every operation here is quadratic in the fields on the grid (the channel maps act
at coefficient resolution, which commutes with the projections), so with the
grids of ``dpa4_jax.so3.grid`` every projection is exact and the operations are
exactly equivariant. Fields are ``(..., D, K, C)``: packed coefficients, grid
frames (one on S2), channels; ``scalars`` are the invariant ``(..., 2C)``
l = 0, k = 0 values of the two operands, side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.nn.linear import ChannelLinear, DegreeLinear, FocusLinear, uniform_per_degree
from dpa4_jax.so3.grid import GridProjection, s2_projection, so3_projection

Dtype = Any
GRID_OPS = ("glu", "mlp", "branch")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Which grid and which point-wise operation.

    ``so3``: the SO(3) grid with frames up to ``kmax`` (else the S2 Lebedev grid);
    ``op``: ``glu`` (the plain product of the two operands), ``mlp`` (a product of two
    channel mixes, then a channel mix back) or ``branch`` (``branches`` products
    weighted by a softmax of the scalars), the reference's ``grid_mlp``/``grid_branch``.
    """

    so3: bool = False
    kmax: int = 1
    op: str = "glu"
    branches: int = 1

    def projection(self, lmax: int) -> GridProjection:
        return so3_projection(lmax, min(self.kmax, lmax)) if self.so3 else s2_projection(lmax)

    @classmethod
    def from_options(cls, so3: bool, kmax: int, mlp: bool, branches: int) -> GridSpec:
        """The reference's precedence: a positive branch count wins over ``grid_mlp``."""
        op = "branch" if branches > 0 else "mlp" if mlp else "glu"
        return cls(so3, kmax, op, max(1, branches))


class GridMLP(nn.Module):
    """``out_proj(product(left_proj u, right_proj v))`` with a hidden width of ``2C``.

    Self mode (``cross`` False): both maps see each frame's ``[u | v]`` (``2C -> 2C``), so
    they form self and cross quadratic terms; cross mode keeps the roles: ``(W_l u)(W_r v)``.
    """

    cross: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, u, v, scalars, projection: GridProjection):
        pd = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        channels = u.shape[-1]
        if not self.cross:
            u = v = jnp.concatenate([u, v], axis=-1)
        left = ChannelLinear(2 * channels, name="left_proj", **pd)(u)
        right = ChannelLinear(2 * channels, name="right_proj", **pd)(v)
        return ChannelLinear(channels, name="out_proj", **pd)(projection.product(left, right))


class GridBranch(nn.Module):
    """``out_proj(sum_b softmax(router(scalars))_b  product_b)``: ``branches`` quadratic products of
    channel mixes, routed by invariant scalars only (so the routing stays rotation invariant)."""

    branches: int
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, u, v, scalars, projection: GridProjection):
        pd = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        channels = u.shape[-1]
        left = ChannelLinear(self.branches * channels, name="left_proj", **pd)(u)
        right = ChannelLinear(self.branches * channels, name="right_proj", **pd)(v)
        value = projection.evaluate(left) * projection.evaluate(right)  # (..., G, B C)
        value = value.reshape(*value.shape[:-1], self.branches, channels)
        route = jax.nn.softmax(ChannelLinear(self.branches, name="router", **pd)(scalars), axis=-1)  # (..., B)
        mixed = jnp.einsum("...gbc,...b->...gc", value, route)
        return ChannelLinear(channels, name="out_proj", **pd)(projection.integrate(mixed))


def grid_operation(spec: GridSpec, cross: bool, name: str, **pd):
    """``(u, v, scalars, projection) -> (..., D, K, C)``, the point-wise operation of ``spec``
    (a module named ``name`` when it has weights)."""
    if spec.op not in GRID_OPS:
        raise ValueError(f"grid operation {spec.op!r}: expected one of {GRID_OPS}")
    if spec.op == "mlp":
        return GridMLP(cross, name=name, **pd)
    if spec.op == "branch":
        return GridBranch(spec.branches, name=name, **pd)
    return lambda u, v, scalars, projection: projection.product(u, v)


class GridActivation(nn.Module):
    """The point-wise grid operation of an FFN; the reference nests its weights as ``act.grid_op``."""

    spec: GridSpec
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, u, v, scalars, projection: GridProjection):
        pd = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        return grid_operation(self.spec, False, "grid_op", **pd)(u, v, scalars, projection)


def gate_and_swiglu(y, u0, v0, gate_logits):
    """The scalar path of every grid net: all coefficients times ``sigmoid(gate_logits)``, and the
    l = 0, k = 0 slot plus ``silu(u0) v0`` (a SwiGLU of the operands' scalars).

    ``y`` ``(..., D, K, C)``; ``u0``, ``v0``, ``gate_logits`` ``(..., C)``.
    """
    y = y * jax.nn.sigmoid(gate_logits)[..., None, None, :]
    return y.at[..., 0, 0, :].add(jax.nn.silu(u0) * v0)


class MessageNodeGrid(nn.Module):
    """The reference's ``message_node_so3``: an SO(3)-grid product of each node's aggregated message
    (the query) with its own features (the context), added to the message before the output mix.

    ``(N, D, F C), (N, D, F C) -> (N, D, F C)`` per focus stream: per-degree expansion of both to
    ``K`` frames (``frame_expand``), the grid operation, the scalar gate and SwiGLU (``scalar_gate``
    per focus stream), per-degree contraction back to one frame (``frame_contract``), and a
    per-channel ``residual_scale`` that starts at 1e-3 (the branch starts almost closed).
    """

    lmax: int
    n_focus: int
    spec: GridSpec
    mlp_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, message, node):
        pd = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        n_node, dim, width = message.shape
        n_focus, channels = self.n_focus, width // self.n_focus
        projection = self.spec.projection(self.lmax)
        n_frames = projection.n_frames
        per_focus = lambda a: a.reshape(n_node, dim, n_focus, channels).transpose(0, 2, 1, 3)  # (N, F, D, C)
        query, context = per_focus(message), per_focus(node)
        scalars = jnp.concatenate([query[:, :, 0], context[:, :, 0]], axis=-1)  # (N, F, 2C)
        expand = DegreeLinear(self.lmax, n_frames * channels, kernel_init=uniform_per_degree, name="frame_expand", **pd)
        frames = lambda a: expand(a).reshape(n_node, n_focus, dim, n_frames, channels)
        y = grid_operation(self.spec, True, "grid_op", **pd)(frames(query), frames(context), scalars, projection)
        gate = FocusLinear(channels, n_focus, init_std=0.01, use_bias=self.mlp_bias, name="scalar_gate", **pd)
        y = gate_and_swiglu(y, query[:, :, 0], context[:, :, 0], gate(scalars))
        contract = DegreeLinear(self.lmax, channels, kernel_init=uniform_per_degree, name="frame_contract", **pd)
        y = contract(y.reshape(n_node, n_focus, dim, -1))
        scale = self.param("residual_scale", nn.initializers.constant(1e-3), (n_focus, channels), self.param_dtype)
        return (y * scale[None, :, None, :]).transpose(0, 2, 1, 3).reshape(n_node, dim, width)
