"""The DPA4 energy model: from species and edge vectors to per-atom energies (paper Fig. 2a).

``DPA4`` is a pure Flax (linen) module. It sees the geometry only through the
edge vectors ``r_ij = x_j - x_i (+ periodic shift)``, so forces, virial and stress
all follow from one gradient with respect to them (``dpa4_jax.physics``).
Padding edges (``edge_mask`` False) contribute exactly nothing; padding nodes
get an energy that the caller masks out.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpa4_jax import geometry
from dpa4_jax.config import ModelConfig
from dpa4_jax.nn.embedding import ChargeSpinEmbedding, EnvironmentSeed, TypeEmbedding
from dpa4_jax.nn.ffn import GridFFN, ScalarGLU
from dpa4_jax.nn.grid import GridSpec
from dpa4_jax.nn.linear import Dense
from dpa4_jax.nn.norm import EquivariantRMSNorm, ScalarRMSNorm
from dpa4_jax.nn.radial import BesselBasis, RadialMLP
from dpa4_jax.nn.so2_conv import EdgeGeometry, SO2Convolution
from dpa4_jax.so3.wigner import (
    EdgeFrame,
    edge_frames,
    edge_quaternion,
    quaternion_to_matrix,
)
from dpa4_jax.zbl import zbl_pair_energy

Dtype = Any
DEGREE_NORM_FLOOR = 0.25  # (sum_j env^2 + 0.25)^-1/2: features of sparse neighbourhoods fade smoothly at rcut


def ffn_grid(cfg: ModelConfig) -> GridSpec:
    """The block FFNs' grid: S2 Lebedev (the paper's), or SO(3) with ``ffn_so3_grid``."""
    return GridSpec.from_options(cfg.ffn_so3_grid, cfg.kmax, cfg.grid_mlp[2], cfg.grid_branch[2])


def message_node_grid(cfg: ModelConfig) -> GridSpec | None:
    """The SO(2) convolutions' message-node grid product (``message_node_so3``), or None."""
    if not cfg.message_node_so3:
        return None
    return GridSpec.from_options(True, cfg.kmax, cfg.grid_mlp[1], cfg.grid_branch[1])


class InteractionBlock(nn.Module):
    """``x + SO2Conv(x)``, then ``x + FFN(x)`` per FFN layer, each branch between the optional RMS norms of
    ``sandwich_norm`` [SO(2) pre, SO(2) post, FFN pre, FFN post] (the paper's: SO(2) post-norm, FFN pre-norm)."""

    config: ModelConfig
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # bf16 mixed precision: matrix products in bf16, the rest in float32

    @nn.compact
    def __call__(self, x, radial, geo: EdgeGeometry):
        cfg = self.config
        pd = dict(param_dtype=self.param_dtype)
        mm = dict(pd, matmul_dtype=self.matmul_dtype)
        so2_pre, so2_post, ffn_pre, ffn_post = cfg.sandwich_norm

        def norm(on: bool, name: str, **kw):
            return EquivariantRMSNorm(cfg.lmax, name=name, **kw, **pd) if on else (lambda h: h)

        conv = SO2Convolution(cfg.lmax, cfg.mmax, cfg.n_focus, cfg.mixing_layers, cfg.radial_so2_rank,
                              cfg.n_atten_head, focus_norm=cfg.edge_norm, eps=cfg.eps, mlp_bias=cfg.mlp_bias,
                              message_node_grid=message_node_grid(cfg), radial_mode=cfg.radial_so2_mode,
                              name="so2_conv", **mm)
        # Reference: post-SO(2) norm eps 1e-5 with edge_norm, 1.0 without.
        post_eps = 1e-5 if cfg.edge_norm else 1.0
        x = x + norm(so2_post, "post_so2_norm", eps=post_eps)(conv(norm(so2_pre, "pre_so2_norm")(x), radial, geo))
        for i in range(cfg.ffn_blocks):
            ffn = GridFFN(cfg.lmax, cfg.hidden_ffn, cfg.mlp_bias, ffn_grid(cfg), name=f"ffns_{i}", **mm)
            x = x + norm(ffn_post, f"post_ffn_norms_{i}")(ffn(norm(ffn_pre, f"pre_ffn_norms_{i}")(x)))
        return x


class GLUFitting(nn.Module):
    """Energy head: ``W2 (value * silu(gate))``, ``[value | gate] = W1 x + b`` (no output bias)."""

    hidden: int
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # bf16 mixed precision: matrix products in bf16, the rest in float32

    @nn.compact
    def __call__(self, x):
        mm = dict(param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype)
        h = Dense(2 * self.hidden, use_bias=True, name="hidden_layers_0", **mm)(x)
        h = h[:, :self.hidden] * jax.nn.silu(h[:, self.hidden:])
        return Dense(1, name="output_layer", **mm)(h)[:, 0]


class EdgeCache(NamedTuple):
    """What every block shares about the edges, computed once per forward pass (``DPA4._edge_cache``)."""

    vec: jnp.ndarray  # (E, 3) edge vectors the learned branch sees (+z on padding edges, clamped with ZBL)
    unclamped_vec: jnp.ndarray  # (E, 3) the true edge vectors (+z on padding edges)
    keep: jnp.ndarray  # (E, 1) 1 on real edges, 0 on padding edges
    env: jnp.ndarray  # (E, 1) message envelope s_5
    rbf: jnp.ndarray  # (E, n_radial) radial basis
    frame: EdgeFrame  # truncated Wigner-D rows
    edge_weight: jnp.ndarray  # (E, 1) keep times the ZBL source gate
    geo: EdgeGeometry  # what the SO(2) convolutions read


class DPA4(nn.Module):
    """Per-atom energies ``(N,)`` of a (batched, padded) graph.

    Variables: ``params`` (trainable) and ``stats/energy_bias`` ``(ntypes,)``, the
    per-element energy fitted by least squares before training (not trained).
    """

    config: ModelConfig
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # bf16 mixed precision: matrix products in bf16, the rest in float32

    @nn.compact
    def __call__(self, species, edge_vec, senders, receivers, edge_mask, edge_gamma=None, charge_spin=None):
        """
        Args:
          species: ``(N,)`` int type indices into ``config.type_map``.
          edge_vec: ``(E, 3)`` vectors from the centre (receiver) to the neighbour (sender).
          senders, receivers: ``(E,)`` node indices (messages flow sender -> receiver).
          edge_mask: ``(E,)`` bool, False on padding edges.
          edge_gamma: optional ``(E,)`` angles: each edge frame is rolled by its angle about the bond (the
            local z axis), the reference's ``random_gamma`` in training. The SO(2) convolution commutes with
            such rolls (every local operation is SO(2)-equivariant and the gates read m = 0 only), so the
            energy does not depend on them beyond round-off: the rolls only decorrelate rounding from the
            frame choice.
          charge_spin: ``(N, 2)`` each atom's frame's total charge and spin multiplicity (NaN: not given, then
            ``config.default_chg_spin``), read only with ``config.add_chg_spin_ebd``.
        """
        cfg = self.config
        mm = dict(param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype)
        edges = self._edge_cache(edge_vec.astype(self.param_dtype), senders, receivers, edge_mask, edge_gamma,
                                 species.shape[0])
        type_emb = TypeEmbedding(cfg.ntypes, cfg.channels, name="type_embedding", param_dtype=self.param_dtype)(species)
        if cfg.add_chg_spin_ebd:  # the reference adds the frame's condition to its atoms' type embeddings
            condition = ChargeSpinEmbedding(cfg.channels, name="charge_spin_embedding", param_dtype=self.param_dtype)
            type_emb = type_emb + condition(self._charge_spin(charge_spin, species))
        radial = RadialMLP(cfg.radial_hidden or cfg.channels, (cfg.lmax + 1) * cfg.channels, norm=cfg.edge_norm,
                           name="radial_embedding", **mm)(edges.rbf)
        radial = radial.reshape(-1, cfg.lmax + 1, cfg.channels) * edges.env[:, :, None]  # (E, L+1, C)
        x = self._initial_state(species, type_emb, radial, edges)

        # ---- interaction blocks, read-out, energy head -----------------------------------------
        edge_type = (type_emb[senders] + type_emb[receivers]) * edges.keep
        radial = radial + edge_type[:, None, :]
        for i in range(cfg.n_blocks):
            x = InteractionBlock(cfg, name=f"blocks_{i}", **mm)(x, radial, edges.geo)
        energy = GLUFitting(cfg.hidden_fitting, name="fitting", **mm)(self._readout(x))
        bias = self.variable("stats", "energy_bias", lambda: jnp.zeros((cfg.ntypes,), self.param_dtype))
        energy = energy + bias.value[species]
        if cfg.bridging == "zbl":
            energy = energy + self._zbl_energy(species, edges.unclamped_vec, senders, receivers, edge_mask,
                                               species.shape[0])
        return energy

    def _charge_spin(self, charge_spin, species) -> jnp.ndarray:
        """``(N, 2)``: the given charge and spin multiplicity, ``config.default_chg_spin`` where not given."""
        default = self.config.default_chg_spin
        if charge_spin is None:
            if default is None:
                raise ValueError("this model embeds the total charge and spin multiplicity (add_chg_spin_ebd) and "
                                 "has no default_chg_spin: give charge_spin")
            return jnp.broadcast_to(jnp.asarray(default, self.param_dtype), (species.shape[0], 2))
        charge_spin = charge_spin.astype(self.param_dtype)
        if default is None:  # frames without them are refused where they are read (calculator, training data)
            return charge_spin
        return jnp.where(jnp.isnan(charge_spin), jnp.asarray(default, charge_spin.dtype), charge_spin)

    def _edge_cache(self, edge_vec, senders, receivers, edge_mask, edge_gamma, n_node) -> EdgeCache:
        """Lengths, envelopes, radial basis, frames and degree normalisation of the edges (once per pass)."""
        cfg, dtype = self.config, self.param_dtype
        keep = edge_mask[:, None].astype(dtype)
        # Padding edges get the unit vector +z: every norm and frame stays finite.
        vec = unclamped_vec = jnp.where(edge_mask[:, None], edge_vec, jnp.array([0.0, 0.0, 1.0], dtype))
        r = geometry.safe_norm(vec, cfg.eps)  # (E, 1)
        source_gate = None
        if cfg.bridging == "zbl":
            # The learned branch sees the clamped distance (Eq. 2-3) and a frozen direction below r_in ...
            clamped = geometry.inner_clamp(r, cfg.bridging_r_inner, cfg.bridging_r_outer)
            vec = vec * (clamped / r)
            r = clamped
            # ... and nodes with a neighbour in the frozen zone stop sending messages (Eq. 4-5).
            switch = geometry.bridging_switch(r, cfg.bridging_r_inner, cfg.bridging_r_outer)[:, 0]
            source_gate = geometry.source_gate(switch, senders, edge_mask, n_node)
        env = geometry.envelope(r, cfg.rcut, cfg.env_exp[1]) * keep  # (E, 1)
        rbf = BesselBasis(cfg.n_radial, cfg.rcut, cfg.env_exp[0], name="radial_basis", param_dtype=dtype)(r) * keep
        rotation = quaternion_to_matrix(edge_quaternion(vec, r, cfg.eps))
        if edge_gamma is not None:
            rotation = geometry.z_rotation(edge_gamma.astype(dtype)) @ rotation
        frame = edge_frames(rotation, cfg.lmax, cfg.mmax)
        deg = jax.ops.segment_sum(env[:, 0] ** 2, receivers, n_node)
        inv_sqrt_deg = (1.0 / jnp.sqrt(deg + DEGREE_NORM_FLOOR))[:, None]  # (N, 1)
        edge_weight = keep if source_gate is None else keep * source_gate[:, None]  # (E, 1)
        geo = EdgeGeometry(senders, receivers, frame, env[:, 0], inv_sqrt_deg,
                           source_gate)
        return EdgeCache(vec, unclamped_vec, keep, env, rbf, frame, edge_weight, geo)

    def _initial_state(self, species, type_emb, radial, edges: EdgeCache):
        """Node features ``(N, (L+1)^2, C)`` before the blocks: the FiLM-conditioned type embedding (l = 0) and
        the geometric initial embedding GIE (l >= 1)."""
        cfg, dtype = self.config, self.param_dtype
        pd = dict(param_dtype=dtype)
        channels, senders, receivers, n_node = cfg.channels, edges.geo.senders, edges.geo.receivers, species.shape[0]
        seed_dim = min(channels, 128)
        type_dim = min(32, max(8, channels // 4))
        rbf_dim = max(32, seed_dim - 2 * type_dim)
        film = EnvironmentSeed(
            cfg.ntypes, channels, embed_dim=seed_dim, axis_dim=min(4 if seed_dim < 64 else 8, seed_dim - 1),
            type_dim=type_dim, hidden_dim=min(256, max(2 * seed_dim, rbf_dim + 2 * type_dim)), rbf_dim=rbf_dim,
            eps=cfg.eps, mlp_bias=cfg.mlp_bias, name="env_seed_embedding", **pd, matmul_dtype=self.matmul_dtype,
        )(species, edges.vec, edges.rbf, edges.env, edges.edge_weight, senders, receivers, edges.geo.inv_sqrt_deg)
        scale_logit, shift_logit = film[:, :channels], film[:, channels:]
        if cfg.edge_norm:
            scale_logit = ScalarRMSNorm(1, cfg.eps, name="film_scale_norm", **pd)(scale_logit[:, None])[:, 0]
            shift_logit = ScalarRMSNorm(1, cfg.eps, name="film_shift_norm", **pd)(shift_logit[:, None])[:, 0]
        strength = lambda name: jnp.exp(self.param(name, nn.initializers.constant(math.log(0.01)), (1,), dtype))
        x0 = (type_emb * (1.0 + strength("film_scale_strength_log") * jnp.tanh(scale_logit))
              + strength("film_shift_strength_log") * jnp.tanh(shift_logit))
        # GIE (Eq. 13-14): Y_lm(r^_ij) R_l(r_ij), degree-normalised. Row m = 0 of D^l(R) is Y_l(r^). Summed over
        # edges per degree: no (E, (L+1)^2 - 1, C) array is assembled.
        gie = [jax.ops.segment_sum((block[:, min(l, cfg.mmax)] * edges.edge_weight)[:, :, None] * radial[:, l, None, :],
                                   receivers, n_node) for l, block in enumerate(edges.frame.blocks) if l > 0]
        return jnp.concatenate([x0[:, None]] + [g * edges.geo.inv_sqrt_deg[:, :, None] for g in gie], axis=1)

    def _readout(self, x):
        """The invariant descriptor ``(N, C)``: ``x_0 + FFN(x_0)`` on the l = 0 channel (``so3_readout``
        "none"), or the l = 0 channel of ``x + FFN(x)`` with an SO(3)-grid FFN on all degrees ("glu",
        "mlp"), which folds the l > 0 geometry into the scalars."""
        cfg = self.config
        mm = {"param_dtype": self.param_dtype, "matmul_dtype": self.matmul_dtype}
        if cfg.so3_readout == "none":
            return x[:, 0] + ScalarGLU(cfg.hidden_ffn, cfg.mlp_bias, name="output_ffn", **mm)(x[:, 0])
        grid = GridSpec(so3=True, kmax=cfg.kmax, op=cfg.so3_readout)
        return x[:, 0] + GridFFN(cfg.lmax, cfg.hidden_ffn, cfg.mlp_bias, grid, name="output_ffn", **mm)(x)[:, 0]

    def _zbl_energy(self, species, edge_vec, senders, receivers, edge_mask, n_node):
        """Analytical ZBL of every pair within rcut (Eq. 39-40), half to each end.

        Like the reference it acts on the true (unclamped) distances and is not
        switched off at rcut (the step there is below 1e-6 eV for light pairs).
        """
        z = jnp.asarray(np.array(self.config.atomic_numbers), edge_vec.dtype)[species]
        r2 = jnp.sum(edge_vec * edge_vec, axis=-1)
        r = jnp.sqrt(jnp.maximum(r2, 1e-20))
        pair = jnp.where(edge_mask, zbl_pair_energy(r, z[senders], z[receivers]), 0.0)
        return 0.5 * jax.ops.segment_sum(pair, receivers, n_node)
