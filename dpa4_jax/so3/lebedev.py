"""Lebedev quadrature on the sphere and the grid projections of the FFN (paper Eq. 31-33).

The rules come from ``scipy.integrate.lebedev_rule``. A rule of precision p
integrates every polynomial of degree <= p on the sphere exactly, so the
projections below are exact (hence exactly equivariant) whenever the integrand
stays within that degree.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.integrate import lebedev_rule

from dpa4_jax.so3.harmonics import harmonics_float64
from dpa4_jax.so3.layout import degree_of_packed

# Precisions scipy.integrate.lebedev_rule provides (the same set as the reference's table).
RULE_PRECISIONS = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 35, 41, 47, 53, 59,
                   65, 71, 77, 83, 89, 95, 101, 107, 113, 119, 125, 131)


def _smallest_precision(required: int) -> int:
    for precision in RULE_PRECISIONS:
        if precision >= required:
            return precision
    raise ValueError(f"no Lebedev rule has precision >= {required}")


@dataclasses.dataclass(frozen=True, eq=False)
class LebedevGrid:
    """A Lebedev rule: ``points`` (K, 3) unit vectors, ``weights`` (K,) summing to 1."""

    precision: int
    points: np.ndarray
    weights: np.ndarray

    @classmethod
    @functools.cache
    def exact_for(cls, degree: int) -> LebedevGrid:
        """The smallest rule that integrates polynomials of ``degree`` exactly."""
        precision = _smallest_precision(max(int(degree), 1))
        points, weights = lebedev_rule(precision)
        return cls(precision, np.ascontiguousarray(points.T), weights / weights.sum())

    @classmethod
    def for_product(cls, lmax: int) -> LebedevGrid:
        """Grid of the FFN non-linearity: the product of two degree-L fields projected
        back on degree L has degree 3L (the reference's rule choice, paper Eq. 33)."""
        return cls.exact_for(3 * lmax)

    @functools.cache
    def projections(self, lmax: int) -> tuple[np.ndarray, np.ndarray]:
        """``to_grid`` (K, D) and ``from_grid`` (D, K) with ``D = (lmax+1)**2``.

        ``to_grid = Y / sqrt(L+1)`` evaluates a packed coefficient vector on the
        grid; ``from_grid = (2l+1) sqrt(L+1) w Y^T`` is its exact inverse on
        degree <= L (discrete orthogonality, paper Eq. 32), and the
        ``sqrt(L+1)`` factors follow the reference's scaling.
        """
        y = harmonics_float64(self.points, lmax)
        scale = np.sqrt(lmax + 1.0)
        degree_factor = 2.0 * degree_of_packed(lmax) + 1.0
        to_grid = y / scale
        from_grid = (y * (self.weights[:, None] * scale * degree_factor[None, :])).T
        return to_grid, from_grid
