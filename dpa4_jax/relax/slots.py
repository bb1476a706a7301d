"""Host side of a batched relaxation: each structure as a one-graph ``GraphsTuple`` that carries its optimizer
state (a *slot*, fields in :mod:`dpa4_jax.relax.step`), its neighbour list at ``rcut + skin``, and the packing
of slots into padded batches and back.

A slot leaves a batch with its whole state and may come back later (a structure whose rebuilt list no longer
fits waits outside for room): its path does not depend on the company it keeps.
"""

from __future__ import annotations

import jraph
import numpy as np
import scipy.linalg
from ase import Atoms

from dpa4_jax import graph as graphs
from dpa4_jax.relax.fire import FireParameters


class StructureError(ValueError):
    """A structure that cannot be relaxed; the message names it (its index in the input)."""


def _check(atoms: Atoms, name: str, cell_filter: bool) -> None:
    if len(atoms) == 0:
        raise StructureError(f"{name}: no atoms")
    if cell_filter and not atoms.pbc.all():
        raise StructureError(f"{name}: the cell filter needs a cell periodic in all three directions (pbc="
                             f"{atoms.pbc.tolist()}); relax it with cell_filter=False")
    if atoms.constraints:
        raise StructureError(f"{name}: constraints ({', '.join(type(c).__name__ for c in atoms.constraints)}) "
                             "are not supported")


def new_slot(atoms: Atoms, index: int, *, config, rcut: float, skin: float, cell_filter: bool,
             exp_cell_factor: float | None, min_pair_dist: float, fire: FireParameters,
             dtype=np.float64) -> jraph.GraphsTuple:
    """The slot of structure ``index`` before its first step (ASE's ``FIRE(FrechetCellFilter(atoms))`` at start:
    ``F = I``, zero velocity, ``dt``, ``a = astart``).

    Raises:
      StructureError: no atoms, an element outside the type map of ``config`` (the model's ``ModelConfig``), a
        charge or spin it cannot read, non-finite positions or cell, a singular cell, atoms closer than
        ``min_pair_dist``, a cell filter on a cell that is not fully periodic, constraints.
    """
    name = f"structure {index} ({atoms.get_chemical_formula()}, {len(atoms)} atoms)"
    _check(atoms, name, cell_filter)
    try:
        g = graphs.atoms_graph(atoms, config, rcut + skin, name)
    except ValueError as error:  # graphs.GraphError included
        raise StructureError(str(error)) from None
    edges = (g.senders, g.receivers, g.edges["shifts"])
    pairs, distances = graphs.close_pairs(atoms.positions, atoms.cell.array, atoms.pbc, min_pair_dist, edges, name)
    if len(pairs):
        raise StructureError(f"{name}: overlapping atoms: {graphs.describe_close_pairs(pairs, distances, min_pair_dist)}")
    n = len(atoms)
    x = np.asarray(atoms.positions, dtype)
    eye = np.eye(3, dtype=dtype)[None]
    one = lambda value, kind=dtype: np.array([value], dtype=kind)  # noqa: E731
    return g._replace(
        nodes={"species": g.nodes["species"], "x": x, "velocity": np.zeros_like(x), "reference": x.copy()},
        globals={**g.globals,  # what structure_graph gives a graph ("cell", replaced at each step), kept for the model
                 "cell0": np.asarray(atoms.cell.array, dtype)[None], "pbc": np.asarray(atoms.pbc, bool)[None],
                 "cell_dof": np.zeros((1, 3, 3), dtype), "cell_velocity": np.zeros((1, 3, 3), dtype),
                 "reference_deformation": eye.copy(),
                 "exp_cell_factor": one(float(n) if exp_cell_factor is None else exp_cell_factor),
                 "dt": one(fire.dt), "a": one(fire.astart), "n_positive": one(0, np.int32),
                 "steps": one(0, np.int32), "index": one(index, np.int32)})


def deformation(slot: jraph.GraphsTuple) -> np.ndarray:
    """``F`` ``(3, 3)`` of a slot (identity without a cell filter, where its cell rows stay zero)."""
    g = slot.globals
    return scipy.linalg.expm(np.asarray(g["cell_dof"][0], np.float64) / float(g["exp_cell_factor"][0]))


def current_geometry(slot: jraph.GraphsTuple) -> tuple[np.ndarray, np.ndarray]:
    """``(positions (N, 3), cell (3, 3))`` of a slot's degrees of freedom (:func:`step.geometry` on the host)."""
    m = np.eye(3) + (deformation(slot) - np.eye(3)).T
    return np.asarray(slot.nodes["x"], np.float64) @ m, np.asarray(slot.globals["cell0"][0], np.float64) @ m


def rebuild(slot: jraph.GraphsTuple, cutoff: float) -> jraph.GraphsTuple:
    """The slot with a new neighbour list (at ``cutoff`` = rcut + skin) for its current geometry."""
    positions, cell = current_geometry(slot)
    name = f"structure {int(slot.globals['index'][0])}"
    senders, receivers, shifts = graphs.neighbor_list(positions, cell, slot.globals["pbc"][0], cutoff, name)
    g = slot.globals
    return slot._replace(
        senders=senders, receivers=receivers, edges={"shifts": shifts}, n_edge=np.array([len(senders)], np.int32),
        nodes=dict(slot.nodes, reference=slot.nodes["x"].copy()),
        globals=dict(g, reference_deformation=deformation(slot).astype(g["cell_dof"].dtype)[None]))


def size(slot: jraph.GraphsTuple) -> tuple[int, int]:
    """``(atoms, edges)`` of a slot."""
    return int(slot.n_node[0]), int(slot.n_edge[0])


def pack(slots: list[jraph.GraphsTuple], budget: graphs.Budget) -> jraph.GraphsTuple:
    """Slots as one batch padded to ``budget``."""
    return graphs.pad(graphs.batch(slots), budget)


def pack_empty(template: jraph.GraphsTuple, budget: graphs.Budget) -> jraph.GraphsTuple:
    """A batch of padding only, with the fields of ``template`` (a device with nothing to do)."""
    empty = template._replace(**{f: np.asarray(v)[:0] for f, v in template._asdict().items() if not isinstance(v, dict)},
                              nodes={k: v[:0] for k, v in template.nodes.items()},
                              edges={k: v[:0] for k, v in template.edges.items()},
                              globals={k: v[:0] for k, v in template.globals.items()})
    return graphs.pad(empty, budget)


def unpack(batch: jraph.GraphsTuple, count: int) -> list[jraph.GraphsTuple]:
    """The first ``count`` slots of a padded batch (host arrays)."""
    return jraph.unbatch_np(batch)[:count]
