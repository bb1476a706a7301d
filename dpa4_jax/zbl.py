"""Analytical Ziegler-Biersack-Littmark (ZBL) screened nuclear repulsion (paper Eq. 39-40)."""

from __future__ import annotations

import jax.numpy as jnp

_KE = 14.3996  # e^2 / (4 pi eps0) in eV * Angstrom, as in the reference
_BOHR = 0.5291772109  # Angstrom
_PHI_A = (0.18175, 0.50986, 0.28022, 0.028171)
_PHI_B = (3.1998, 0.94229, 0.4029, 0.20162)


def zbl_pair_energy(r: jnp.ndarray, zi: jnp.ndarray, zj: jnp.ndarray) -> jnp.ndarray:
    """ZBL energy of pairs at distance ``r`` with nuclear charges ``zi``, ``zj`` (all ``(E,)``), in eV.

    ``V = k_e Zi Zj / r * phi(r / a)``, ``a = 0.88534 a_0 / (Zi^0.23 + Zj^0.23)``,
    ``phi(x) = sum_k a_k exp(-b_k x)``. The distance is floored at 1e-10 A like the
    reference, so coincident atoms give a huge but finite energy.
    """
    r = jnp.maximum(r, 1e-10)
    screening = 0.88534 * _BOHR / (zi**0.23 + zj**0.23)
    x = r / screening
    phi = sum(a * jnp.exp(-b * x) for a, b in zip(_PHI_A, _PHI_B))
    return _KE * zi * zj / r * phi
