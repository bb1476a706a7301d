"""Edge-local frames and the real Wigner-D rows that rotate features into them.

Each edge gets a rotation R with ``R u = +z`` (u the unit edge vector), from two
quaternion charts blended smoothly (paper Eq. 48-51): a single chart is singular
at one pole, the blend is smooth everywhere. The SO(2) convolution only needs
the rows of the Wigner-D blocks with ``|m| <= mmax`` (m-truncation, Eq. 57).

Wigner-D rows from quadrature: for every degree l, ``D^l(R) Y_l(v) = Y_l(R v)``
and the harmonics are orthogonal on a Lebedev grid exact to degree 2l, so::

    D^l(R)[m, :] = (2l+1) sum_k w_k Y_lm(R v_k) Y_l(v_k)

This needs only the harmonics of the rotated grid (e3nn-jax) and a constant
matrix per degree: no Euler angles (no gimbal-lock singularities in the
gradient) and no fitted coefficient tables, for any l.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from dpa4_jax.so3.harmonics import harmonics_float64, spherical_harmonics
from dpa4_jax.so3.layout import packed_index
from dpa4_jax.so3.lebedev import LebedevGrid


def _safe_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


def _smooth_step(x: jnp.ndarray) -> jnp.ndarray:
    """C-infinity step on [0, 1]: exp(-1/x) / (exp(-1/x) + exp(-1/(1-x)))."""
    x = jnp.clip(x, 0.0, 1.0)
    tiny = jnp.finfo(x.dtype).eps
    left = jnp.exp(-1.0 / jnp.maximum(x, tiny))
    right = jnp.exp(-1.0 / jnp.maximum(1.0 - x, tiny))
    inner = left / (left + right)
    return jnp.where(x <= 0.0, 0.0, jnp.where(x >= 1.0, 1.0, inner))


def edge_quaternion(edge_vec: jnp.ndarray, edge_len: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Unit quaternions (w, x, y, z) of the global-to-local rotation, ``(E, 4)``.

    Args:
      edge_vec: ``(E, 3)`` edge vectors.
      edge_len: ``(E, 1)`` their (eps-regularised) lengths.
      eps: regularisation of every norm (the reference's ``sqrt(|x|^2 + eps^2)``).
    """
    unit = edge_vec / jnp.sqrt(edge_len * edge_len + eps * eps)
    x, y, z = unit[..., 0], unit[..., 1], unit[..., 2]
    zero = jnp.zeros_like(x)
    # Chart regular except at u = -z, and chart regular except at u = +z.
    q_pos = jnp.stack([1.0 + z, y, -x, zero], axis=-1)
    q_neg = jnp.stack([-x, zero, 1.0 - z, y], axis=-1)
    q_pos = q_pos / _safe_norm(q_pos, eps)
    q_neg = q_neg / _safe_norm(q_neg, eps)
    # Shortest-arc normalised lerp, weighted by a smooth step of the polar coordinate.
    q_pos = jnp.where(jnp.sum(q_neg * q_pos, axis=-1, keepdims=True) < 0.0, -q_pos, q_pos)
    weight = _smooth_step(0.5 * (z + 1.0))[..., None]
    q = (1.0 - weight) * q_neg + weight * q_pos
    return q / _safe_norm(q, eps)


def quaternion_to_matrix(q: jnp.ndarray) -> jnp.ndarray:
    """``(..., 4)`` quaternions (w, x, y, z) to ``(..., 3, 3)`` rotation matrices."""
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


@functools.cache
def _row_tables(lmax: int, mmax: int):
    """Constants for the truncated Wigner rows.

    Returns the grid points ``(K, 3)``, and per degree l: the packed indices of the
    kept rows (m = -min(l, mmax) .. min(l, mmax)) and ``B_l = (2l+1) w Y_l(v)``, ``(K, 2l+1)``.
    """
    grid = LebedevGrid.exact_for(2 * lmax)
    y = harmonics_float64(grid.points, lmax)
    rows, bases = [], []
    for l in range(lmax + 1):
        k = min(l, mmax)
        rows.append(np.array([packed_index(l, m) for m in range(-k, k + 1)]))
        bases.append((2 * l + 1) * grid.weights[:, None] * y[:, l * l:(l + 1) ** 2])
    return grid.points, tuple(rows), tuple(bases)


class EdgeFrame(NamedTuple):
    """Truncated Wigner-D rows of every edge, one array per degree.

    ``blocks[l]`` has shape ``(E, 2*min(l, mmax)+1, 2l+1)``: row m of ``D^l(R)``
    for ``m = -min(l, mmax) .. min(l, mmax)``.
    """

    blocks: tuple[jnp.ndarray, ...]


def edge_frames(rotation: jnp.ndarray, lmax: int, mmax: int) -> EdgeFrame:
    """Wigner-D rows for rotations ``(E, 3, 3)`` (quadrature identity in the module doc)."""
    points, rows, bases = _row_tables(lmax, mmax)
    dtype = rotation.dtype
    rotated = jnp.einsum("eij,kj->eki", rotation, jnp.asarray(points, dtype))  # (E, K, 3): R v_k
    y_rot = spherical_harmonics(rotated, lmax, normalize=False)  # (E, K, (L+1)^2)
    blocks = tuple(
        jnp.einsum("ekr,kc->erc", y_rot[..., r], jnp.asarray(b, dtype)) for r, b in zip(rows, bases)
    )
    return EdgeFrame(blocks)


def rotate_in(degrees: list[jnp.ndarray], frame: EdgeFrame, lmax: int, mmax: int) -> list[jnp.ndarray]:
    """Rotate edge features given per degree (``degrees[l]``: ``(E, 2l+1, C)``) into the edge frames, keeping
    ``|m| <= mmax``, as one array per |m|: the m = 0 rows ``(E, L+1, C)`` (l = 0..L), then for m = 1..mmax
    the (-m, +m) pairs ``(E, L-m+1, 2, C)`` (l = m..L; -m, +m): the m-major layout (``MMajorLayout``) with
    each pair's rows interleaved by degree.
    """
    # rows[l][min(l, mmax) + m] is the (l, m) component, (E, 1, C); split, not sliced: the reverse pass joins
    # the cotangents instead of padding each one to (E, 2l+1, C) and adding them.
    rows = [jnp.split(jnp.einsum("erc,ecf->erf", d, x), d.shape[1], axis=1) for d, x in zip(frame.blocks, degrees)]
    out = [jnp.concatenate([rows[l][min(l, mmax)] for l in range(lmax + 1)], axis=1)]
    for m in range(1, mmax + 1):
        out.append(jnp.concatenate([rows[l][min(l, mmax) + sign] for l in range(m, lmax + 1) for sign in (-m, m)],
                                   axis=1).reshape(-1, lmax - m + 1, 2, rows[0][0].shape[-1]))
    return out


def rotate_out(groups: list[jnp.ndarray], frame: EdgeFrame, lmax: int, mmax: int) -> list[jnp.ndarray]:
    """Rotate local groups (as returned by :func:`rotate_in`) back, one array ``(E, 2l+1, C)`` per degree."""
    # Split, not sliced (see rotate_in): component (l, m) is pieces[|m|][l - |m|][side], (E, 1, C).
    pieces = [[jnp.split(g, 2, axis=2) if m else [g] for g in jnp.split(g_m, g_m.shape[1], axis=1)]
              for m, g_m in enumerate(groups)]
    out = []
    for l, d in enumerate(frame.blocks):
        k = min(l, mmax)
        rows = ([pieces[-m][l + m][0] for m in range(-k, 0)] + [pieces[0][l][0]]
                + [pieces[m][l - m][1] for m in range(1, k + 1)])
        rows = [r.reshape(r.shape[0], 1, r.shape[-1]) for r in rows]
        out.append(jnp.einsum("erc,erf->ecf", d, jnp.concatenate(rows, axis=1)))
    return out

