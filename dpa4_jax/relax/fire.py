"""FIRE and the Fréchet cell filter on a padded batch of structures, step for step as ASE's.

Each structure (graph) of the batch is optimised on its own, as ``ase.optimize.FIRE`` optimises one
``FrechetCellFilter(atoms)`` (or, without the filter, one ``Atoms``); the batch only shares the arrays. The
degrees of freedom of a structure are rows of three numbers, held in a dict:

    "atoms": (N, 3)   positions (no filter), or the positions mapped back to the original cell
                      ``x = r F^-T`` (filter)
    "cell":  (G, 3, 3) the filter's cell rows ``c * log F``: ``F`` the deformation gradient of the cell
                      (``cell = cell_0 F^T``), ``c`` the ``exp_cell_factor`` (default: the number of atoms)

and so are their velocities and forces. Sums over a structure's degrees of freedom (``vdot`` in ASE) add its
atoms' rows and its three cell rows.

FIRE (Bitzek et al., PRL 97, 170201, 2006) in ASE's form, per structure, with ``f`` the filter's forces::

    first step:     v = 0
    later, v.f > 0: v = (1 - a) v + a f / |f| |v|;  if n > Nmin: dt = min(dt finc, dtmax), a = a fa;  n += 1
    later, v.f <= 0: v = 0, a = astart, dt = dt fdec, n = 0
    then            v += dt f;  dr = dt v, scaled to length maxstep if longer (one norm over all rows);  x += dr

The filter's forces (ASE's ``FrechetCellFilter.get_forces``): on the atoms ``F_atoms F``; on the cell the
gradient of the energy with respect to ``log F``, through the Fréchet derivative of ``expm``, of the unit-cell
filter's cell force ``W F^-T`` (``W = -V (sigma + p I)``, ``p`` the ``scalar_pressure``), divided by ``c``.
A structure has converged when every row (atoms and cell) of its filter forces is shorter than ``fmax``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.linalg import expm, expm_frechet


@dataclasses.dataclass(frozen=True)
class FireParameters:
    """ASE's ``FIRE`` settings and defaults (``ase.optimize.FIRE``); ``a`` starts at ``astart``."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


def graph_dot(a: dict, b: dict, node_graph: jnp.ndarray, n_graph: int) -> jnp.ndarray:
    """``(G,)`` sums over each structure's rows of ``a * b`` (ASE's ``np.vdot`` of the flattened vectors)."""
    total = jax.ops.segment_sum(jnp.sum(a["atoms"] * b["atoms"], axis=-1), node_graph, n_graph)
    if "cell" in a:
        total = total + jnp.sum(a["cell"] * b["cell"], axis=(-2, -1))
    return total


def _per_row(per_graph: jnp.ndarray, like: dict, node_graph: jnp.ndarray) -> dict:
    """A per-structure ``(G,)`` value broadcast to the rows of ``like``."""
    out = {"atoms": per_graph[node_graph][:, None]}
    if "cell" in like:
        out["cell"] = per_graph[:, None, None]
    return out


def _where(condition: dict, new: dict, old: dict) -> dict:
    return {k: jnp.where(condition[k], new[k], old[k]) for k in new}


def max_row_norm(forces: dict, node_graph: jnp.ndarray, n_graph: int) -> jnp.ndarray:
    """``(G,)`` the longest row of each structure's forces (ASE's ``Optimizable.gradient_norm``)."""
    largest = jax.ops.segment_max(jnp.linalg.norm(forces["atoms"], axis=-1), node_graph, n_graph)
    largest = jnp.maximum(largest, 0.0)  # structures without atoms (padding graphs) give -inf
    if "cell" in forces:
        largest = jnp.maximum(largest, jnp.max(jnp.linalg.norm(forces["cell"], axis=-1), axis=-1))
    return largest


def fire_step(x: dict, v: dict, f: dict, dt, a, n_positive, first, moving, node_graph, p: FireParameters):
    """One FIRE step of the structures where ``moving`` (``(G,)`` bool); the others keep their state.

    Args:
      x, v, f: degrees of freedom, velocities and forces (dicts of rows, see the module docstring).
      dt, a: ``(G,)`` time steps and mixing parameters; ``n_positive``: ``(G,)`` int, steps since the last
        uphill step (ASE's ``Nsteps``); ``first``: ``(G,)`` bool, no step taken yet (ASE's ``vel is None``).

    Returns:
      ``(x, v, dt, a, n_positive)`` after the step.
    """
    n_graph = dt.shape[0]
    rows = lambda s: _per_row(s, x, node_graph)  # noqa: E731
    vf, ff, vv = graph_dot(f, v, node_graph, n_graph), graph_dot(f, f, node_graph, n_graph), graph_dot(v, v, node_graph, n_graph)
    downhill = ~first & (vf > 0.0)
    reset = ~first & ~(vf > 0.0)
    norm_f, norm_v = rows(jnp.sqrt(jnp.where(ff > 0.0, ff, 1.0))), rows(jnp.sqrt(vv))
    a_rows = rows(a)
    mixed = {k: (1.0 - a_rows[k]) * v[k] + a_rows[k] * f[k] / norm_f[k] * norm_v[k] for k in v}
    v_new = _where(rows(downhill), mixed, {k: jnp.where(rows(reset)[k], 0.0, v[k]) for k in v})
    grow = downhill & (n_positive > p.Nmin)
    dt_new = jnp.where(grow, jnp.minimum(dt * p.finc, p.dtmax), jnp.where(reset, dt * p.fdec, dt))
    a_new = jnp.where(grow, a * p.fa, jnp.where(reset, p.astart, a))
    n_new = jnp.where(downhill, n_positive + 1, jnp.where(reset, 0, n_positive))
    dt_rows = rows(dt_new)
    v_new = {k: v_new[k] + dt_rows[k] * f[k] for k in v}
    dr = {k: dt_rows[k] * v_new[k] for k in v}
    norm_dr = jnp.sqrt(graph_dot(dr, dr, node_graph, n_graph))
    too_long, safe_norm = rows(norm_dr > p.maxstep), rows(jnp.where(norm_dr > 0.0, norm_dr, 1.0))
    dr = {k: jnp.where(too_long[k], p.maxstep * dr[k] / safe_norm[k], dr[k]) for k in dr}
    moving_rows = rows(moving)
    x_new = _where(moving_rows, {k: x[k] + dr[k] for k in x}, x)
    v_new = _where(moving_rows, v_new, v)
    return (x_new, v_new, jnp.where(moving, dt_new, dt), jnp.where(moving, a_new, a),
            jnp.where(moving, n_new, n_positive))


# ---------------------------------------------------------------------------------------------- Fréchet filter
def deformation(cell_dof: jnp.ndarray, exp_cell_factor: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(log F, F)``, both ``(G, 3, 3)``, from the filter's cell rows ``c log F`` (``c = 0``, padding graphs:
    ``F = I``)."""
    log_f = cell_dof / jnp.where(exp_cell_factor > 0, exp_cell_factor, 1.0)[:, None, None]
    return log_f, jax.vmap(expm)(log_f)


def strain_matrix(f: jnp.ndarray) -> jnp.ndarray:
    """``M = I + (F - I)^T`` (``= F^T``, written as ASE's ``set_positions`` does): ``r = x M``, ``cell = cell_0 M``."""
    return jnp.eye(3, dtype=f.dtype) + jnp.swapaxes(f - jnp.eye(3, dtype=f.dtype), -1, -2)


def filter_forces(forces: jnp.ndarray, stress: jnp.ndarray, volume: jnp.ndarray, log_f: jnp.ndarray,
                  f: jnp.ndarray, exp_cell_factor: jnp.ndarray, scalar_pressure, node_graph) -> dict:
    """The Fréchet filter's forces on its degrees of freedom.

    Args:
      forces: ``(N, 3)`` Cartesian forces; stress: ``(G, 3, 3)`` ASE (symmetric) stress; volume: ``(G,)``.
      log_f, f: ``(G, 3, 3)`` from :func:`deformation`.
    """
    eye = jnp.eye(3, dtype=stress.dtype)
    virial = -volume[:, None, None] * (stress + scalar_pressure * eye)
    unit_cell_force = virial @ jnp.linalg.inv(jnp.swapaxes(f, -1, -2))
    # <D expm(L)[E_mn], G> over the 9 directions E_mn: the adjoint of the Fréchet derivative at L is the
    # Fréchet derivative at L^T.
    log_force = jax.vmap(lambda lt, g: expm_frechet(lt, g, compute_expm=False))(jnp.swapaxes(log_f, -1, -2),
                                                                                 unit_cell_force)
    return {"atoms": jnp.einsum("ni,nij->nj", forces, f[node_graph]),
            "cell": log_force / jnp.where(exp_cell_factor > 0, exp_cell_factor, 1.0)[:, None, None]}
