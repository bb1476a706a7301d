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

    Works on per-focus local features of each |m| (``wigner.rotate_in``): the m = 0 rows
    ``(F, E, L+1, C)`` (l = 0..L) and the (-m, +m) pairs ``(F, E, L-m+1, 2, C)`` (l = m..L).
    The gates come from the l = 0 scalar by a per-focus linear map (init N(0, 0.01), a
    zero-initialised bias with ``use_bias``), one per degree, shared across m, so the map stays
    equivariant.
    """

    lmax: int
    n_focus: int = 1
    use_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, groups: list[jnp.ndarray]) -> list[jnp.ndarray]:
        m0 = groups[0]
        n_focus, n_edge, _, c = m0.shape
        scalar = m0[:, :, 0]  # (F, E, C)
        gate_linear = FocusLinear(self.lmax * c, self.n_focus, init_std=0.01, focus_major=True, use_bias=self.use_bias,
                                  param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype, name="gate_linear")
        high = jax.nn.sigmoid(gate_linear(scalar)).reshape(n_focus, n_edge, self.lmax, c)  # degrees 1..L
        # l = 0 gates itself (silu(s) = s sigmoid(s)); rows, not gates, are joined, so no gate array for all
        # degrees is built, sliced and padded back in the reverse pass.
        first, rest = jnp.split(m0, [1], axis=2)  # split, not sliced: the reverse pass joins, no pads
        out = [jnp.concatenate([first * jax.nn.sigmoid(scalar)[:, :, None], rest * high], axis=2)]
        for m, pair in enumerate(groups[1:], start=1):
            # Each side of the pair is gated on its own (no gate array repeated for it, and in the reverse pass
            # two products added, not a reduction over the pair, which XLA:CPU fused into the gate linear's
            # matrix product, which then ran at 1.6 GFLOP/s).
            gate = high[:, :, m - 1:]
            minus, plus = jnp.split(pair, 2, axis=3)
            out.append(jnp.concatenate([minus * gate[:, :, :, None], plus * gate[:, :, :, None]], axis=3))
        return out
