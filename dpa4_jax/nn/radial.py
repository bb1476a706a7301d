"""Radial networks: the radial MLP shared by all blocks and the A1 edge-node product."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpa4_jax import geometry
from dpa4_jax.nn.linear import Dense, product, trunc_normal_fan_in_out
from dpa4_jax.nn.norm import RMSNorm

Dtype = Any


class RadialMLP(nn.Module):
    """``Linear -> RMSNorm -> SiLU -> Linear`` (no biases) on the radial basis.

    Submodule names (``net_0``, ``net_1``, ``net_3``) mirror the reference's
    ``net.{0,1,3}`` so weights map one to one.
    """

    hidden: int
    features: int
    norm: bool = True
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, rbf: jnp.ndarray) -> jnp.ndarray:
        h = Dense(self.hidden, param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, name="net_0")(rbf)
        if self.norm:
            h = RMSNorm(param_dtype=self.param_dtype, name="net_1")(h)
        dense = Dense(self.features, param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, name="net_3")
        return dense(jax.nn.silu(h))


class DegreeMixer(nn.Module):
    """A1: low-rank edge-node SO(2)-equivariant product (paper Eq. 17-20, "degree mixing").

    For every edge a kernel ``K[l_in, l_out, r]`` per |m| is predicted from the
    edge's radial features of degrees 0..L; it mixes degrees within each |m| block
    (the same kernel for -m and +m, so the map commutes with rotations about the
    bond) and is modulated per channel through a rank-R basis::

        y[l_out, m, c] = sum_r B[r, c] sum_{l_in} K_|m|[l_in, l_out, r] x[l_in, m, c]

    ``weight`` is ``((L+1)C, R * sum_m (L-m+1)^2)`` and ``channel_basis`` is ``(R, C)``.
    In this mode the mixer replaces the plain radial scaling of the message.

    With rank 1 the basis is a per-channel factor, which commutes with the rotation into the
    edge frame: ``scale_source`` applies it to the node features before they are gathered, and
    ``__call__`` applies the kernels only (no pass over the edge features).
    """

    lmax: int
    mmax: int
    rank: int
    channels: int
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    def setup(self):
        self.sizes = [self.lmax - m + 1 for m in range(self.mmax + 1)]
        n_kernel = sum(n * n for n in self.sizes)
        self.weight = self.param("weight", trunc_normal_fan_in_out(),
                                 ((self.lmax + 1) * self.channels, n_kernel * self.rank), self.param_dtype)
        self.channel_basis = self.param("channel_basis", trunc_normal_fan_in_out(), (self.rank, self.channels),
                                        self.param_dtype)

    def scale_source(self, x: jnp.ndarray) -> jnp.ndarray:
        """Node features ``(N, D, C)`` times the rank-1 basis (identity for a higher rank)."""
        return x * self.channel_basis[0] if self.rank == 1 else x

    def __call__(self, groups: list[jnp.ndarray], radial: jnp.ndarray) -> list[jnp.ndarray]:
        """Local features of each |m| (``wigner.rotate_in``: ``(E, L+1, C)``, then pairs ``(E, n, 2, C)``),
        ``radial (E, L+1, C)`` -> the same shapes. The features must come from node features that went through
        :meth:`scale_source` (with rank 1 the channel basis is applied there, at the node level, not here)."""
        n_edge = radial.shape[0]
        kernel = product("ei,ik->ek", radial.reshape(n_edge, -1), self.weight, self.matmul_dtype)
        kernel = kernel.reshape(n_edge, -1, self.rank)
        offsets = np.cumsum([0] + [n * n for n in self.sizes])
        out = []
        for m, (n, g) in enumerate(zip(self.sizes, groups)):
            # Per rank r, one batched product per edge, [l_out, l_in] @ [l_in, (pair side,) channel].
            k = kernel[:, offsets[m]:offsets[m + 1]].reshape(n_edge, n, n, self.rank).transpose(0, 3, 2, 1)
            flat = g.reshape(n_edge, n, -1)
            if self.rank == 1:  # the basis went in with scale_source
                out.append(jnp.einsum("eoi,eic->eoc", k[:, 0], flat).reshape(g.shape))
            else:
                out.append(sum(jnp.einsum("eoi,eic->eoc", k[:, r], flat).reshape(g.shape) * self.channel_basis[r]
                               for r in range(self.rank)))
        return out


class BesselBasis(nn.Module):
    """Trainable sinusoidal basis times the C3 envelope: ``sin(w_n r)/r * s_p(r)`` (paper Eq. 15).

    ``adam_freqs (1, n)`` starts at ``w_n = n pi / rcut``.
    """

    n_radial: int
    rcut: float
    envelope_exponent: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, r: jnp.ndarray) -> jnp.ndarray:
        """``(E, 1) -> (E, n_radial)``."""
        init = lambda key, shape, dtype: (jnp.arange(1, shape[1] + 1, dtype=dtype) * (math.pi / self.rcut))[None]
        freqs = self.param("adam_freqs", init, (1, self.n_radial), self.param_dtype)
        return geometry.bessel_basis(r, freqs) * geometry.envelope(r, self.rcut, self.envelope_exponent)
