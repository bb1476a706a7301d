"""The gated activation of the SO(2) stack and the read-out (paper Eq. 67)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpa4_jax.nn.linear import FocusLinear

Dtype = Any


class GatedActivation(nn.Module):
    """SiLU on the l = 0 channel, a sigmoid gate per degree l >= 1 and channel on the rest.

    Works on per-focus features ``(F, E, D, C)`` whose rows have degrees
    ``degrees`` (row 0 is the l = 0 scalar); the gates are computed from that
    scalar by a per-focus linear map (init N(0, 0.01)), one per degree, shared
    across m, so the map stays equivariant.
    """

    degrees: tuple[int, ...]
    n_focus: int = 1
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        lmax = max(self.degrees)
        c = x.shape[-1]
        scalar = x[:, :, 0]  # (F, E, C)
        gate_linear = FocusLinear(lmax * c, self.n_focus, init_std=0.01, param_dtype=self.param_dtype,
                                  matmul_dtype=self.matmul_dtype, name="gate_linear")
        gates = jax.nn.sigmoid(gate_linear(scalar.transpose(1, 0, 2)).transpose(1, 0, 2))
        gates = gates.reshape(*scalar.shape[:2], lmax, c)[:, :, np.asarray(self.degrees[1:]) - 1]
        return jnp.concatenate([jax.nn.silu(x[:, :, :1]), x[:, :, 1:] * gates], axis=2)
