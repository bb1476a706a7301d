"""The gated activation of the SO(2) stack and the read-out (paper Eq. 67)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpa4_jax.nn.linear import FocusLinear

Dtype = Any


class GatedActivation(nn.Module):
    """SiLU on the l = 0 channel, a sigmoid gate per degree l >= 1 and channel on the rest.

    Works on per-focus local blocks ``(F, E, n, C)`` (``MMajorLayout.blocks``:
    block 0 holds m = 0 for l = 0..L, the blocks of |m| hold l = |m|..L). The
    gates come from the l = 0 scalar by a per-focus linear map (init N(0, 0.01),
    a zero-initialised bias with ``use_bias``), one per degree, shared across m,
    so the map stays equivariant.
    """

    lmax: int
    n_focus: int = 1
    use_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, blocks: list[jnp.ndarray]) -> list[jnp.ndarray]:
        m0 = blocks[0]
        n_focus, n_edge, _, c = m0.shape
        scalar = m0[:, :, 0]  # (F, E, C)
        gate_linear = FocusLinear(self.lmax * c, self.n_focus, init_std=0.01, focus_major=True, use_bias=self.use_bias,
                                  param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, name="gate_linear")
        # One sigmoid for every degree: l = 0 gates itself (silu(s) = s sigmoid(s)), l >= 1 by the linear map,
        # so each block is multiplied by its rows of the gates, without slicing and re-assembling the blocks.
        logits = jnp.concatenate([scalar, gate_linear(scalar)], axis=-1)
        gates = jax.nn.sigmoid(logits).reshape(n_focus, n_edge, self.lmax + 1, c)  # degree l at index l
        out = [m0 * gates]
        for i, block in enumerate(blocks[1:]):
            m = i // 2 + 1
            out.append(block * gates[:, :, m:])
        return out
