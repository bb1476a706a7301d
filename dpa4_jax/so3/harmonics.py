"""Real spherical harmonics in the reference's basis.

DPA4 uses real harmonics with the polar axis along +z, "norm" normalisation
(``sum_m Y_lm(u)^2 = 1``) and the packed layout ``index = l*l + l + m``,
``m = -l..l``. For l = 1 the components are ``(y, z, -x)``.

e3nn's harmonics use +y as the polar axis; the reference basis is exactly
e3nn's evaluated at the signed permutation ``P u = (u_y, u_z, -u_x)`` (checked
for l <= 6 against DeePMD-kit 3.2.0's Wigner-D zonal columns in
``tests/test_so3.py``), so we reuse e3nn-jax instead of writing polynomials.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np


def spherical_harmonics(vectors: jnp.ndarray, lmax: int, *, normalize: bool = True) -> jnp.ndarray:
    """Y_lm of ``vectors`` for l = 0..lmax.

    Args:
      vectors: ``(..., 3)`` Cartesian vectors (unit vectors when ``normalize=False``).
      lmax: highest degree.
      normalize: divide by the norm first (e3nn's safe normalisation).

    Returns:
      ``(..., (lmax + 1)**2)`` harmonics in the packed (l, m) layout.
    """
    permuted = jnp.stack([vectors[..., 1], vectors[..., 2], -vectors[..., 0]], axis=-1)
    irreps = e3nn.Irreps.spherical_harmonics(lmax)
    return e3nn.spherical_harmonics(irreps, permuted, normalize=normalize, normalization="norm").array


def harmonics_float64(points: np.ndarray, lmax: int) -> np.ndarray:
    """Host-side float64 harmonics of unit ``points`` (K, 3), for building constants.

    Runs eagerly with 64-bit types on, whatever the global JAX setting, so that
    constant tables are exact in float64 and then cast to the compute dtype.
    """
    # ensure_compile_time_eval: this may run while a function is being traced.
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
        values = spherical_harmonics(jnp.asarray(points, dtype=jnp.float64), lmax, normalize=False)
        return np.asarray(values, dtype=np.float64)
