"""The compiled relaxation step: the model and one FIRE step of every structure of a padded batch.

The batch is one ``jraph.GraphsTuple`` that carries each structure's optimizer state beside its graph
(:mod:`dpa4_jax.relax.slots` builds it)::

    nodes:   species (N,), x (N, 3) atom degrees of freedom, velocity (N, 3),
             reference (N, 3) the atom degrees of freedom when the neighbour list was built
    edges:   shifts (E, 3) (the neighbour list at rcut + skin)
    globals: the graph's own (``graph.structure_graph``: its ``cell`` is replaced by the current one at each step),
             cell0 (G, 3, 3) the starting cell, pbc (G, 3), cell_dof / cell_velocity (G, 3, 3) the filter's cell
             rows and their velocities, reference_deformation (G, 3, 3) F when the list was built,
             exp_cell_factor, dt, a (G,), n_positive, steps, index (G,) int

One step evaluates the model at the current degrees of freedom, tests convergence (ASE's test on the filter's
forces), and moves every structure that has neither converged nor used up its steps. Edges longer than rcut
(the neighbour list holds pairs up to rcut + skin) are masked: they contribute exactly nothing, as pairs beyond
the cutoff do in the calculator's list. After the step it tells, per structure, whether the list still holds
every pair within rcut (``list_valid``): with ``G = F F_ref^-1`` the cell's deformation since the build and
``d`` the largest atom displacement since then (in the cell of the build), a pair that was at least
``rcut + skin`` apart is still at least ``sigma_min(G) (rcut + skin - 2 d)`` apart.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jraph
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpa4_jax import physics
from dpa4_jax.relax import fire
from dpa4_jax.train.distributed import AXIS


@dataclasses.dataclass(frozen=True)
class WithinCutoff:
    """The model with every edge longer than ``rcut`` masked like a padding edge (exactly zero contribution,
    the ZBL term included); a drop-in for the model in :mod:`dpa4_jax.physics`."""

    model: object
    rcut: float

    def apply(self, variables, species, edge_vec, senders, receivers, edge_mask, **kwargs):
        inside = jnp.sum(edge_vec * edge_vec, axis=-1) < self.rcut**2
        return self.model.apply(variables, species, edge_vec, senders, receivers, edge_mask & inside, **kwargs)


def geometry(state: jraph.GraphsTuple, cell_filter: bool, node_graph):
    """``(positions (N, 3), cell (G, 3, 3), log F, F)`` of the current degrees of freedom (``log F``, ``F``
    None without the filter)."""
    g = state.globals
    if not cell_filter:
        return state.nodes["x"], g["cell0"], None, None
    log_f, f = fire.deformation(g["cell_dof"], g["exp_cell_factor"])
    m = fire.strain_matrix(f)
    return jnp.einsum("ni,nij->nj", state.nodes["x"], m[node_graph]), g["cell0"] @ m, log_f, f


def relax_step(model: WithinCutoff, cell_filter: bool, skin: float, p: fire.FireParameters, variables,
               state: jraph.GraphsTuple, settings: dict):
    """``(state, report)``: the model at the current degrees of freedom, then one FIRE step.

    ``settings``: ``fmax``, ``max_steps``, ``scalar_pressure`` (scalars). ``report`` (per graph unless
    said): energy, stress (3, 3), forces (N, 3), positions (N, 3), cell (3, 3) of the evaluated structure,
    fmax, converged, finished (converged, out of steps, or a non-finite result), finite, list_valid.
    """
    n_graph = state.n_node.shape[0]
    node_graph = physics.node_graph(state)
    g = state.globals
    positions, cell, log_f, f = geometry(state, cell_filter, node_graph)
    graph = state._replace(nodes={"species": state.nodes["species"], "positions": positions},
                           globals=dict(g, cell=jnp.where(g["pbc"][:, :, None], cell, 0.0)))
    out = physics.energy_forces_virial(model, variables, graph)
    if cell_filter:
        volume = jnp.abs(jnp.linalg.det(cell))
        forces = fire.filter_forces(out["forces"], out["stress"], volume, log_f, f, g["exp_cell_factor"],
                                    settings["scalar_pressure"], node_graph)
        x, v = {"atoms": state.nodes["x"], "cell": g["cell_dof"]}, {"atoms": state.nodes["velocity"],
                                                                    "cell": g["cell_velocity"]}
    else:
        forces, x, v = {"atoms": out["forces"]}, {"atoms": state.nodes["x"]}, {"atoms": state.nodes["velocity"]}
    fmax = fire.max_row_norm(forces, node_graph, n_graph)
    node_finite = jnp.all(jnp.isfinite(out["forces"]), axis=-1)
    finite = (jnp.isfinite(out["energy"]) & jnp.all(jnp.isfinite(out["stress"]), axis=(-2, -1))
              & (jax.ops.segment_sum((~node_finite).astype(jnp.int32), node_graph, n_graph) == 0))
    converged = finite & (fmax < settings["fmax"])
    finished = converged | ~finite | (g["steps"] >= settings["max_steps"])
    moving = ~finished & jraph.get_graph_padding_mask(state)
    x, v, dt, a, n_positive = fire.fire_step(x, v, forces, g["dt"], g["a"], g["n_positive"], g["steps"] == 0,
                                             moving, node_graph, p)
    new_globals = dict(g, dt=dt, a=a, n_positive=n_positive, steps=g["steps"] + moving.astype(g["steps"].dtype))
    if cell_filter:
        new_globals.update(cell_dof=x["cell"], cell_velocity=v["cell"])
    new_state = state._replace(nodes=dict(state.nodes, x=x["atoms"], velocity=v["atoms"]), globals=new_globals)
    report = {"energy": out["energy"], "stress": out["stress"], "forces": out["forces"], "positions": positions,
              "cell": cell, "fmax": fmax, "converged": converged, "finished": finished, "finite": finite,
              "list_valid": list_valid(new_state, cell_filter, model.rcut, skin, node_graph)}
    return new_state, report


def list_valid(state: jraph.GraphsTuple, cell_filter: bool, rcut: float, skin: float, node_graph) -> jnp.ndarray:
    """``(G,)`` whether each structure's neighbour list (built at rcut + skin) still holds all pairs within rcut."""
    n_graph = state.n_node.shape[0]
    moved = state.nodes["x"] - state.nodes["reference"]
    shrink = jnp.ones((n_graph,), moved.dtype)
    if cell_filter:
        real = jraph.get_graph_padding_mask(state)[:, None, None]
        f_ref = jnp.where(real, state.globals["reference_deformation"], jnp.eye(3, dtype=moved.dtype))
        moved = jnp.einsum("ni,nji->nj", moved, f_ref[node_graph])  # (x - x_ref) F_ref^T: in the build's cell
        _, f = fire.deformation(state.globals["cell_dof"], state.globals["exp_cell_factor"])
        shrink = jnp.linalg.svd(f @ jnp.linalg.inv(f_ref), compute_uv=False)[:, -1]
    largest = jnp.maximum(jax.ops.segment_max(jnp.linalg.norm(moved, axis=-1), node_graph, n_graph), 0.0)
    return shrink * (rcut + skin - 2.0 * largest) > rcut


@functools.lru_cache(maxsize=8)
def compiled_step(model: WithinCutoff, cell_filter: bool, skin: float, p: fire.FireParameters, mesh: Mesh):
    """``step(variables, state, settings) -> (state, report)`` jitted over a stack of sub-batches, one per device
    of ``mesh`` (leading axis, split over the mesh's ``"data"`` axis); the state is donated."""

    def on_device(variables, state, settings):
        squeeze = lambda tree: jax.tree.map(lambda t: t[0], tree)  # noqa: E731
        new_state, report = relax_step(model, cell_filter, skin, p, variables, squeeze(state), settings)
        return jax.tree.map(lambda t: t[None], (new_state, report))

    sharded = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(AXIS), check_vma=False)
    return jax.jit(sharded, donate_argnums=1)
