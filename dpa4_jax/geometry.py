"""Radial functions of the edge length: envelopes, radial basis, zone bridging.

All are pure functions of ``r`` with shape ``(E, 1)`` (or broadcastable).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def safe_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """``sqrt(|x|^2 + eps^2)`` over the last axis, keeping it: ``(..., 3) -> (..., 1)``."""
    return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


def envelope(r: jnp.ndarray, rcut: float, p: int) -> jnp.ndarray:
    """C3 cutoff envelope ``s_p`` (paper Eq. 53-56).

    With ``x = r/rcut`` and ``u = 1 - x`` (both clipped to [0, 1])::

        s_p(r) = u^4 * sum_{k<p} C(k+3, 3) x^k

    It is 1 at r = 0, and it and its first three derivatives vanish at rcut.
    """
    u = jnp.clip((rcut - r) / rcut, 0.0, 1.0)
    x = 1.0 - u
    coefficients = [float(math.comb(k + 3, 3)) for k in range(p)]
    series = jnp.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):  # Horner
        series = c + x * series
    return u**4 * series


def bessel_basis(r: jnp.ndarray, freqs: jnp.ndarray) -> jnp.ndarray:
    """Sinusoidal radial basis ``sin(w_n r) / r`` (paper Eq. 15), ``(E, 1) -> (E, n)``.

    Written as ``w_n sinc(w_n r / pi)`` like the reference, so r -> 0 stays finite
    (limit w_n) for the value and the gradient. ``freqs`` is ``(1, n)``, trainable.
    """
    x = r * freqs
    zero = x == 0.0
    safe_x = jnp.where(zero, 1.0, x)
    return freqs * jnp.where(zero, 1.0, jnp.sin(safe_x) / safe_x)


def _smootherstep_t(r: jnp.ndarray, r_inner: float, r_outer: float) -> jnp.ndarray:
    return jnp.clip((r - r_inner) / (r_outer - r_inner), 0.0, 1.0)


def inner_clamp(r: jnp.ndarray, r_inner: float, r_outer: float) -> jnp.ndarray:
    """Clamped distance ``h_c`` seen by the learned branch (paper Eq. 2-3).

    ``r_in + (r_out - r_in) h(t)`` with ``h(t) = 20t^4 - 45t^5 + 36t^6 - 10t^7``,
    which matches value and first three derivatives of the identity at ``r_out``
    and is flat (frozen geometry) below ``r_in``.
    """
    t = _smootherstep_t(r, r_inner, r_outer)
    h = t**4 * (20.0 + t * (-45.0 + t * (36.0 - 10.0 * t)))
    return jnp.where(r >= r_outer, r, r_inner + (r_outer - r_inner) * h)


def bridging_switch(r: jnp.ndarray, r_inner: float, r_outer: float) -> jnp.ndarray:
    """Bridging amplitude ``h_w(r) = 35t^4 - 84t^5 + 70t^6 - 20t^7`` in [0, 1] (paper Eq. 4)."""
    t = _smootherstep_t(r, r_inner, r_outer)
    return t**4 * (35.0 + t * (-84.0 + t * (70.0 - 20.0 * t)))


def source_gate(switch: jnp.ndarray, senders: jnp.ndarray, edge_mask: jnp.ndarray, n_nodes: int) -> jnp.ndarray:
    """Source-freeze gate (paper Eq. 5): ``eta_j = prod_{edges j->k} w(r_jk)``, returned per edge as ``eta[src]``.

    Any neighbour inside ``r_in`` (w = 0) freezes the source node. The product is
    taken as exp(sum log w) over the non-zero factors plus a count of exact
    zeros, so its gradient is well defined everywhere (w' = 0 wherever w = 0).

    Args:
      switch: ``(E,)`` bridging amplitudes.
      senders: ``(E,)`` source node of every edge.
      edge_mask: ``(E,)`` bool, False on padding edges (they count as w = 1).
      n_nodes: number of nodes.

    Returns:
      ``(E,)`` gate of every edge's source node.
    """
    w = jnp.where(edge_mask, switch, 1.0)
    is_zero = w <= 0.0
    log_w = jnp.log(jnp.where(is_zero, 1.0, w))
    log_eta = jax.ops.segment_sum(log_w, senders, n_nodes)
    n_zero = jax.ops.segment_sum(is_zero.astype(w.dtype), senders, n_nodes)
    eta = jnp.where(n_zero > 0.5, 0.0, jnp.exp(log_eta))
    return eta[senders]


def z_rotation(gamma: jnp.ndarray) -> jnp.ndarray:
    """``(..., 3, 3)`` rotations by angles ``gamma`` ``(...)`` about the z axis."""
    c, s, zero, one = jnp.cos(gamma), jnp.sin(gamma), jnp.zeros_like(gamma), jnp.ones_like(gamma)
    rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)
