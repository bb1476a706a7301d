"""The EMFA SO(2) convolution (paper Sec. 2.2, Fig. 2c, Eq. 17-30).

Per block: mix channels per degree, rotate each source node's features into the
frame of the edge (m-truncated), apply the edge-node product (A1) and a stack of
SO(2) linears with gated activations per focus stream, weigh the focus streams
against each other (A2), rotate back, and aggregate over incoming edges with
envelope-gated attention (A3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.nn.activation import GatedActivation
from dpa4_jax.nn.attention import envelope_gated_softmax
from dpa4_jax.nn.grid import GridSpec, MessageNodeGrid
from dpa4_jax.nn.linear import (
    ChannelLinear,
    DegreeLinear,
    FocusLinear,
    SO2Linear,
    normal,
)
from dpa4_jax.nn.norm import ScalarRMSNorm
from dpa4_jax.nn.radial import DegreeMixer
from dpa4_jax.so3.layout import MMajorLayout
from dpa4_jax.so3.wigner import EdgeFrame, rotate_in, rotate_out

Dtype = Any

FOCUS_LABEL_SMOOTHING = 0.02  # reference value; the softmax temperature is 1


class EdgeGeometry(NamedTuple):
    """Per-edge quantities shared by every block (computed once per forward pass)."""

    senders: jnp.ndarray  # (E,) source node j
    receivers: jnp.ndarray  # (E,) destination node i
    frame: EdgeFrame  # truncated Wigner-D rows
    env: jnp.ndarray  # (E,) message envelope, 0 on padding edges
    inv_sqrt_deg: jnp.ndarray  # (N, 1) smooth degree normalisation
    source_gate: jnp.ndarray | None  # (E,) ZBL source-freeze gate, or None


class SO2Convolution(nn.Module):
    """``(N, (L+1)^2, C) -> (N, (L+1)^2, C)`` message passing of one interaction block.

    ``radial`` is ``(E, L+1, C)``: radial features per degree, edge types included.
    ``mlp_bias`` adds zero-initialised biases to the channel mixes (l = 0), the SO(2)
    linears (l = 0), the activation gates and the focus competition.
    """

    lmax: int
    mmax: int
    n_focus: int
    mixing_layers: int
    radial_rank: int
    n_heads: int
    focus_norm: bool
    eps: float
    mlp_bias: bool = False
    message_node_grid: GridSpec | None = None  # the reference's message_node_so3 (nn.grid.MessageNodeGrid)
    # "degree_channel": A1 (DegreeMixer); "none": the radial features scale each degree of the local features
    # (the reference's radial_so2_mode, as DPA4-Nano sets it).
    radial_mode: str = "degree_channel"
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, radial: jnp.ndarray, geo: EdgeGeometry) -> jnp.ndarray:
        n_node, _, channels = x.shape
        lmax, mmax, n_focus = self.lmax, self.mmax, self.n_focus
        hidden = n_focus * channels
        layout = MMajorLayout(lmax, mmax)
        pd = dict(param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype)

        x = DegreeLinear(lmax, hidden, use_bias=self.mlp_bias, name="pre_focus_mix", **pd)(x)
        if hidden != channels:
            radial = ChannelLinear(hidden, name="radial_hidden_proj", **pd)(radial)

        # Edge message in the local frame: A1, then the SO(2) stack per focus stream. Local features are one
        # array per |m| (wigner.rotate_in: the m = 0 rows, then the (-m, +m) pairs), whole in every step. Source
        # features are gathered per degree from node-level slices (in the reverse pass: scattered per degree).
        mixer = (None if self.radial_mode == "none" else
                 DegreeMixer(lmax, mmax, self.radial_rank, hidden, name="radial_degree_mixer", **pd))
        source = x if mixer is None else mixer.scale_source(x)
        local = rotate_in([source[:, l * l:(l + 1) ** 2][geo.senders] for l in range(lmax + 1)], geo.frame, lmax, mmax)
        if mixer is None:  # the radial features scale each degree (rows of |m| are degrees m..L)
            groups = [g * (radial if m == 0 else radial[:, m:, None]) for m, g in enumerate(local)]
        else:
            groups = mixer(local, radial)  # (E, L+1, H), then (E, n, 2, H)
        groups = [jnp.moveaxis(g.reshape(*g.shape[:-1], n_focus, channels), -2, 0) for g in groups]  # (F, E, ..., C)
        focus_scalar = groups[0][:, :, 0]
        bias_scale = self._first_bias_scale(radial, geo.env) if self.mlp_bias else None
        for i in range(self.mixing_layers):
            y = SO2Linear(lmax, mmax, channels, n_focus, use_bias=self.mlp_bias, name=f"so2_linears_{i}", **pd)(
                groups, bias_scale if i == 0 else None)
            if i < self.mixing_layers - 1:  # the last SO(2) layer is linear
                y = GatedActivation(lmax, n_focus, use_bias=self.mlp_bias, name=f"non_linearities_{i}", **pd)(y)
            groups = [g + d for g, d in zip(groups, y)]
        # Aggregation over incoming edges (A2, A3). The per-edge weights scale channels and the rotation back
        # mixes rows only: one weight per edge (one focus stream, at most one head) scales the rotation itself,
        # as does the truncation rescale (Eq. 59), so no pass over the features is added.
        x0 = x[:, 0].reshape(n_node, n_focus, channels)
        focus = self._focus_weights(focus_scalar).T[:, :, None] if n_focus > 1 else 1.0  # (E, F, 1)
        weight = self._edge_weights(x0, radial[:, 0], geo) * focus  # (E, F, H)
        rescale = layout.degree_rescale
        if weight.shape[1:] == (1, 1):
            back = EdgeFrame(tuple(d * (weight * s) for d, s in zip(geo.frame.blocks, rescale)))
        else:
            back = EdgeFrame(tuple(d * s for d, s in zip(geo.frame.blocks, rescale)))
            n_groups = weight.shape[-1]
            weight = weight.transpose(1, 0, 2)  # (F, E, H) against (F, E, ..., H, C / H)
            groups = [(g.reshape(*g.shape[:-1], n_groups, -1)
                       * weight.reshape(*weight.shape[:2], *(1,) * (g.ndim - 3), n_groups, 1)).reshape(g.shape)
                      for g in groups]
        groups = [jnp.moveaxis(g, 0, -2).reshape(*g.shape[1:-1], hidden) for g in groups]
        out = jnp.concatenate([jax.ops.segment_sum(d, geo.receivers, n_node)
                               for d in rotate_out(groups, back, lmax, mmax)], axis=1)
        if self.n_heads == 0:
            out = out * geo.inv_sqrt_deg[:, :, None]
        else:
            out = (out.reshape(n_node, -1, n_focus, self.n_heads, channels // self.n_heads)
                   * self._output_gate(x0)[:, None, :, :, None]).reshape(out.shape)
        if self.message_node_grid is not None:
            out = out + MessageNodeGrid(lmax, n_focus, self.message_node_grid, self.mlp_bias,
                                        name="message_node_grid_product", **pd)(out, x)
        return DegreeLinear(lmax, channels, zero_init=True, use_bias=self.mlp_bias, name="post_focus_mix", **pd)(out)

    def _first_bias_scale(self, radial: jnp.ndarray, env: jnp.ndarray) -> jnp.ndarray:
        """Factor of the first SO(2) layer's scalar bias (paper S-1.6, Eq. 69), ``(F, E, C)``.

        A constant bias would give an edge at the cutoff, whose message has otherwise
        vanished, a scalar offset; the first layer's bias is therefore multiplied by the
        edge's l = 0 radial feature (lifted to the hidden width, edge types included) and
        by the message envelope ``s_5``, and goes to zero with them. Later layers act on
        features already modulated this way. As in the reference (which adds the bias, then
        ``bias * (radial * env - 1)``: the same sum), the radial feature is the one the blocks
        see, whose radial part already carries a factor ``s_5`` that Eq. 14's does not.
        """
        n_edge = radial.shape[0]
        radial0 = radial[:, 0].reshape(n_edge, self.n_focus, -1).transpose(1, 0, 2)
        return radial0 * env[None, :, None]

    def _focus_weights(self, scalar: jnp.ndarray) -> jnp.ndarray:
        """A2: per-edge softmax competition of the focus streams, ``(F, E, C) -> (F, E)``.

        Logits from the l = 0 channel of each stream after the edge-node product;
        label smoothing keeps every stream alive.
        """
        s = scalar.transpose(1, 0, 2)  # (E, F, C)
        if self.focus_norm:
            s = ScalarRMSNorm(self.n_focus, self.eps, self.param_dtype, name="focus_compete_norm")(s)
        w = self.param("adamw_focus_compete_w", normal(0.01), (s.shape[-1], self.n_focus), self.param_dtype)
        logits = jnp.einsum("efc,cf->ef", s, w)
        if self.mlp_bias:
            logits = logits + self.param("focus_compete_bias", nn.initializers.zeros, (self.n_focus,), self.param_dtype)
        alpha = jax.nn.softmax(logits, axis=-1)
        alpha = alpha * (1.0 - FOCUS_LABEL_SMOOTHING) + FOCUS_LABEL_SMOOTHING / self.n_focus
        return alpha.T

    def _edge_weights(self, x0, radial0, geo: EdgeGeometry) -> jnp.ndarray:
        """Per-edge aggregation weights ``(E, F, H)``: the envelope (times the ZBL source gate) with no
        attention heads (then ``H = 1``), else A3's envelope-gated attention (Eq. 25-30).

        Args:
          x0: ``(N, F, C)`` l = 0 node features after the pre-focus mix.
          radial0: ``(E, hidden)`` l = 0 radial features.
        """
        if self.n_heads == 0:
            weight = geo.env if geo.source_gate is None else geo.env * geo.source_gate
            return weight[:, None, None]
        n_node, n_focus, channels = x0.shape
        n_edge, n_heads = radial0.shape[0], self.n_heads
        head_dim = channels // n_heads
        pd = dict(param_dtype=self.param_dtype)
        qk_in = ScalarRMSNorm(n_focus, self.eps, name="attn_qk_norm", **pd)(x0)
        q = FocusLinear(channels, n_focus, name="attn_q_proj", matmul_dtype=self.matmul_dtype, **pd)(qk_in)
        k = FocusLinear(channels, n_focus, name="attn_k_proj", matmul_dtype=self.matmul_dtype, **pd)(qk_in)
        q = q[geo.receivers].reshape(n_edge, n_focus, n_heads, head_dim)
        k = k[geo.senders].reshape(n_edge, n_focus, n_heads, head_dim)
        logit_w = self.param("adamw_attn_logit_w", normal(0.01), (channels, n_focus, n_heads), self.param_dtype)
        logits = jnp.sum(q * k, axis=-1) * head_dim**-0.5
        logits = logits + jnp.einsum("efc,cfh->efh", radial0.reshape(n_edge, n_focus, channels), logit_w)
        z = self.param("adamw_attn_z_bias_raw", nn.initializers.constant(0.5413), (n_focus, n_heads),
                       self.param_dtype)  # softplus(0.5413) = 1: the null mass starts at one neighbour's worth
        return envelope_gated_softmax(logits, geo.env, geo.receivers, n_node, z, self.eps, geo.source_gate)

    def _output_gate(self, x0) -> jnp.ndarray:
        """A3's per-head sigmoid output gate ``(N, F, H)`` from the l = 0 node features ``(N, F, C)``."""
        gate_in = ScalarRMSNorm(self.n_focus, self.eps, name="attn_output_gate_norm", param_dtype=self.param_dtype)(x0)
        gate_w = self.param("adamw_attn_gate_w", normal(0.01), (x0.shape[-1], self.n_focus, self.n_heads),
                            self.param_dtype)
        return jax.nn.sigmoid(jnp.einsum("nfc,cfh->nfh", gate_in, gate_w))
