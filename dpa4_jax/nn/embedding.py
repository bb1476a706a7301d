"""Initial node state: type embedding, FiLM environment seed and geometric initial embedding (paper Eq. 6-14)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.config import CHARGE_RANGE, MULTIPLICITY_RANGE
from dpa4_jax.nn.linear import Dense, normal

Dtype = Any


class TypeEmbedding(nn.Module):
    """Per-type vectors, ``adam_type_embedding (ntypes+1, C)``; the last row (padding) is zero.

    Init N(0, 1/sqrt(ntypes + C)) as in the reference; negative types select the
    padding row (``padding=False``: a table of ``ntypes`` rows and no padding row).
    """

    ntypes: int
    features: int
    param_dtype: Dtype = jnp.float32
    padding: bool = True

    @nn.compact
    def __call__(self, species: jnp.ndarray) -> jnp.ndarray:
        def init(key, shape, dtype):
            table = normal((self.ntypes + self.features) ** -0.5)(key, shape, dtype)
            return table.at[-1].set(0.0) if self.padding else table

        rows = self.ntypes + int(self.padding)
        table = self.param("adam_type_embedding", init, (rows, self.features), self.param_dtype)
        return table[jnp.where(species < 0, self.ntypes, species)] if self.padding else table[species]


CHARGE_OFFSET = -CHARGE_RANGE[0]  # row of charge 0


class ChargeSpinEmbedding(nn.Module):
    """A frame's total charge and spin multiplicity as a ``(.., C)`` condition, added to the type embedding of
    its atoms (the reference's ``add_chg_spin_ebd``, DPA4-OMol25):
    ``silu([E_q[charge + 100] | E_s[multiplicity]] W + b)`` with tables ``charge_embedding`` (200, C) and
    ``spin_embedding`` (100, C) (no padding rows; ``config.CHARGE_RANGE``, ``MULTIPLICITY_RANGE``) and the layer
    ``mix_layer`` (2C -> C)."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, charge_spin: jnp.ndarray) -> jnp.ndarray:
        """``charge_spin`` ``(..., 2)``: whole numbers (charge, multiplicity) in the tables' ranges."""
        pd = dict(param_dtype=self.param_dtype)
        charge = charge_spin[..., 0].astype(jnp.int32) + CHARGE_OFFSET
        spin = charge_spin[..., 1].astype(jnp.int32)
        rows = (CHARGE_RANGE[1] - CHARGE_RANGE[0], MULTIPLICITY_RANGE[1])
        q = TypeEmbedding(rows[0], self.features, padding=False, name="charge_embedding", **pd)(charge)
        s = TypeEmbedding(rows[1], self.features, padding=False, name="spin_embedding", **pd)(spin)
        return Dense(self.features, use_bias=True, activation=jax.nn.silu, name="mix_layer", **pd)(
            jnp.concatenate([q, s], axis=-1))


class EnvironmentSeed(nn.Module):
    """Env-seed FiLM descriptor (paper Eq. 9-12), ``(N, 2C)`` logits of the FiLM scale and shift.

    Per edge ``r~ = [s, s r^]`` with ``s = env / r`` is coupled to a learned edge
    embedding ``g`` (radial basis and both endpoint types); ``A = sum_j r~ (x) g``
    is degree-normalised, and the rotation-invariant Gram form
    ``A^T A[:, :, :axis_dim]`` is projected by the zero-initialised ``output_proj``.
    ``mlp_bias`` gives the four layers of the radial and edge networks biases,
    initialised N(0, 1) like the reference's (the projection stays bias free).
    """

    ntypes: int
    channels: int
    embed_dim: int
    axis_dim: int
    type_dim: int
    hidden_dim: int
    rbf_dim: int
    eps: float = 1e-7
    mlp_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, species, edge_vec, edge_rbf, edge_env, edge_weight, senders, receivers, inv_sqrt_deg):
        """
        Args:
          species: ``(N,)`` type indices.
          edge_vec: ``(E, 3)``; edge_rbf: ``(E, n_radial)``; edge_env: ``(E, 1)``.
          edge_weight: ``(E, 1)`` source gate times edge mask.
          senders, receivers: ``(E,)``; inv_sqrt_deg: ``(N, 1)``.
        """
        dense = lambda n, act=None, name=None: Dense(n, use_bias=self.mlp_bias, activation=act, name=name,
                                                     param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype)
        inv_r = 1.0 / jnp.sqrt(jnp.sum(edge_vec * edge_vec, axis=-1, keepdims=True) + self.eps**2)
        s = edge_env * inv_r
        r_tilde = jnp.concatenate([s, s * edge_vec * inv_r], axis=-1)  # (E, 4)
        types = TypeEmbedding(self.ntypes, self.type_dim, self.param_dtype, name="env_type_embed")(species)
        rbf = dense(self.rbf_dim, name="rbf_proj_layer2")(dense(self.rbf_dim, jax.nn.silu, "rbf_proj_layer1")(edge_rbf))
        g_in = jnp.concatenate([rbf, types[senders], types[receivers]], axis=-1)
        g = dense(self.embed_dim, name="g_layer2")(dense(self.hidden_dim, jax.nn.silu, "g_layer1")(g_in))
        outer = (r_tilde[:, :, None] * g[:, None, :]) * edge_weight[:, :, None]  # (E, 4, embed)
        a = jax.ops.segment_sum(outer, receivers, species.shape[0]) * inv_sqrt_deg[:, :, None]
        gram = jnp.einsum("nki,nkj->nij", a, a[:, :, :self.axis_dim])  # (N, embed, axis)
        output_proj = Dense(2 * self.channels, zero_init=True, param_dtype=self.param_dtype,
                            matmul_dtype=self.matmul_dtype, name="output_proj")
        return output_proj(gram.reshape(gram.shape[0], -1))
