"""Coefficient <-> grid projections of the grid non-linearities (paper Eq. 31-33, and the reference's SO(3) grid).

A grid non-linearity evaluates coefficient fields at grid points, combines
them point by point, and projects the result back. Two grids:

* **S2** (the paper's FFN): the Lebedev points. A field is one coefficient
  vector ``(D,)`` per channel, ``f(v) = sum_d Y_d(v) c_d`` (scaled, see
  ``LebedevGrid.projections``).
* **SO(3)** (the reference's ``ffn_so3_grid``, ``message_node_so3`` and
  ``so3_readout``): rotations ``R = R_z(gamma) R(v)``, ``R(v)`` the edge frame
  of a Lebedev point ``v`` (``R(v) v = +z``) and ``gamma`` on a uniform circle
  grid. A field carries ``K = 2 kmax + 1`` frames ``k = 0, -1, +1, ..., -kmax, +kmax``
  per coefficient, ``f(R) = sum_{l,m,k} D^l(R)[k, m] c_{lm,k}``: frame ``k = 0`` is
  the S2 field (row 0 of ``D^l(R(v))`` is ``Y_l(v)``), the others add the
  dependence on the roll. ``from_grid`` integrates against the Haar measure
  (Lebedev weights times ``1/n_gamma``) with the orthogonality factor ``2l+1``.

Projections are float64 NumPy constants; a frame ``|k| > l`` does not exist
for degree l and keeps zero columns (and rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dpa4_jax.geometry import z_rotation
from dpa4_jax.so3.layout import degree_of_packed
from dpa4_jax.so3.lebedev import LebedevGrid
from dpa4_jax.so3.wigner import edge_frames, edge_quaternion, quaternion_to_matrix


@dataclasses.dataclass(frozen=True, eq=False)
class GridProjection:
    """``to_grid`` ``(G, D, K)`` and ``from_grid`` ``(D, K, G)``, ``D = (L+1)^2``, ``K`` frames."""

    to_grid: np.ndarray
    from_grid: np.ndarray

    @property
    def n_frames(self) -> int:
        return self.to_grid.shape[2]

    def evaluate(self, x: jnp.ndarray) -> jnp.ndarray:
        """``(..., D, K, C) -> (..., G, C)``: the fields at the grid points."""
        return jnp.einsum("gdk,...dkc->...gc", jnp.asarray(self.to_grid, x.dtype), x)

    def integrate(self, f: jnp.ndarray) -> jnp.ndarray:
        """``(..., G, C) -> (..., D, K, C)``: coefficients of grid values."""
        return jnp.einsum("dkg,...gc->...dkc", jnp.asarray(self.from_grid, f.dtype), f)

    def product(self, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
        """The point-wise product of two fields ``(..., D, K, C)``, projected back."""
        return self.integrate(self.evaluate(a) * self.evaluate(b))


@functools.cache
def s2_projection(lmax: int) -> GridProjection:
    """The paper's Lebedev grid of the FFN product (one frame)."""
    to_grid, from_grid = LebedevGrid.for_product(lmax).projections(lmax)
    return GridProjection(to_grid[:, :, None], from_grid[:, None, :])


def frame_orders(kmax: int) -> tuple[int, ...]:
    """The frames ``k`` in the reference's order: 0 first, then -1, +1, ..., -kmax, +kmax."""
    return (0,) + tuple(k for j in range(1, kmax + 1) for k in (-j, j))


def n_gamma(kmax: int) -> int:
    """Roll samples: a quadratic product and its projection carry roll frequencies up to ``3 kmax``
    (the reference's rule: ``3 kmax + 1`` uniform samples resolve them)."""
    return 1 if kmax == 0 else 3 * kmax + 1


@functools.cache
def so3_projection(lmax: int, kmax: int) -> GridProjection:
    """The reference's SO(3) grid: the Lebedev rule of precision >= 3 lmax times ``n_gamma(kmax)`` rolls."""
    if not 0 <= kmax <= lmax:
        raise ValueError(f"need 0 <= kmax <= lmax, got kmax={kmax}, lmax={lmax}")
    sphere = LebedevGrid.for_product(lmax)
    n_roll = n_gamma(kmax)
    gamma = 2.0 * math.pi * np.arange(n_roll) / n_roll
    frames = _wigner_rows(sphere.points, gamma, lmax, kmax)
    weights = np.repeat(sphere.weights, n_roll) / n_roll  # Haar measure, point-major like the rotations
    orders = frame_orders(kmax)
    to_grid = np.zeros((len(weights), (lmax + 1) ** 2, len(orders)))
    for l, rows in enumerate(frames):  # rows: (G, 2 min(l, kmax) + 1, 2l + 1), row k of D^l
        kl = min(l, kmax)
        for j, k in enumerate(orders):
            if abs(k) <= l:
                to_grid[:, l * l:(l + 1) ** 2, j] = rows[:, kl + k]
    degree_factor = 2.0 * degree_of_packed(lmax) + 1.0
    from_grid = np.transpose(to_grid * (weights[:, None, None] * degree_factor[None, :, None]), (1, 2, 0))
    return GridProjection(to_grid, from_grid)


def _wigner_rows(points: np.ndarray, gamma: np.ndarray, lmax: int, kmax: int) -> list[np.ndarray]:
    """Rows ``|k| <= kmax`` of ``D^l(R_z(gamma_r) R(v_p))`` for every degree, ``(P * R, 2 min(l, kmax) + 1,
    2l + 1)`` (point-major), float64. ``R(v)`` is the model's edge frame of a unit vector ``v``. One compiled
    call: op-by-op evaluation of the harmonics takes seconds."""

    def rows(v, gamma):
        frames = quaternion_to_matrix(edge_quaternion(v, jnp.ones_like(v[:, :1]), 1e-14))
        rotations = jnp.einsum("rij,pjk->prik", z_rotation(gamma), frames).reshape(-1, 3, 3)
        return edge_frames(rotations, lmax, kmax).blocks

    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
        blocks = jax.jit(rows)(jnp.asarray(points, jnp.float64), jnp.asarray(gamma, jnp.float64))
        return [np.asarray(b) for b in blocks]
