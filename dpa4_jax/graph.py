"""Host-side graphs: neighbour lists, ``jraph.GraphsTuple`` batches and static padding.

A graph holds, per node, the ``species`` (type index) and ``positions``; per edge,
the integer image ``shifts`` of the sender; per graph, the ``cell`` and the total
``charge_spin`` (charge, spin multiplicity; NaN where not given). Edge vectors
are formed inside the traced function (``dpa4_jax.physics.edge_vectors``) so that
gradients reach positions and cell::

    r_ij = x[sender] - x[receiver] + shift @ cell

Every pair within the cutoff is kept, with all its periodic images (cells
smaller than the cutoff included): there is no ``sel`` truncation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jraph
import numpy as np
import vesin

from dpa4_jax.elements import species_indices


class GraphError(ValueError):
    """A structure that cannot be turned into a graph; the message names it."""


def _check_structure(positions, cell, pbc, name):
    if not np.all(np.isfinite(positions)):
        bad = np.argwhere(~np.isfinite(positions).all(axis=1))[:, 0]
        raise GraphError(f"{name}: non-finite (NaN or inf) positions for atom(s) {bad[:10].tolist()}")
    if np.any(pbc):
        if not np.all(np.isfinite(cell)):
            raise GraphError(f"{name}: non-finite cell")
        periodic = cell[np.asarray(pbc)]
        if np.linalg.matrix_rank(periodic, tol=1e-8) < len(periodic) or abs(np.linalg.det(cell)) < 1e-8:
            raise GraphError(f"{name}: singular cell (volume {np.linalg.det(cell):.3g} A^3) with pbc={list(pbc)}")


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: Sequence[bool], cutoff: float, name: str = "structure"):
    """All ordered pairs (i, j, image) with ``|x_j - x_i + S @ cell| < cutoff``, i != j or S != 0.

    Args:
      positions: ``(N, 3)``; atoms need not be wrapped into the cell.
      cell: ``(3, 3)`` lattice vectors as rows (ignored along non-periodic directions).
      pbc: three booleans.

    Returns:
      ``senders`` (j), ``receivers`` (i) as int32 ``(E,)`` and ``shifts`` (S) as ``(E, 3)`` float64.
    """
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    _check_structure(positions, cell, pbc, name)
    n = len(positions)
    if n == 0:
        raise GraphError(f"{name}: structure has no atoms")
    box = cell.copy()
    offset = np.zeros((n, 3))
    if pbc.any():
        # Wrap into the cell along periodic directions (vesin expects that); keep the offsets
        # so that the shifts refer to the original, unwrapped positions.
        frac = np.linalg.solve(cell.T, positions.T).T
        offset = np.where(pbc, np.floor(frac), 0.0)
        positions = positions - offset @ cell
    else:
        box = np.zeros((3, 3))
    i, j, s = vesin.NeighborList(cutoff=float(cutoff), full_list=True).compute(
        points=positions, box=box, periodic=pbc, quantities="ijS")
    shifts = s.astype(np.float64) - offset[j] + offset[i]
    return j.astype(np.int32), i.astype(np.int32), shifts


def edge_lengths(positions, cell, senders, receivers, shifts) -> np.ndarray:
    """``|x[sender] - x[receiver] + shift @ cell|`` of every edge, ``(E,)`` float64 (the host-side twin of
    ``physics.edge_vectors``)."""
    positions, cell = np.asarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64).reshape(3, 3)
    vectors = positions[senders] - positions[receivers] + np.asarray(shifts, np.float64) @ cell
    return np.linalg.norm(vectors, axis=-1)


# vesin's cell list has cells of the cutoff's size: at 0.1 A a 192-atom water box (12.4 A) needs 10^6 cells
# (27 ms a frame), at 1.5 A about one atom per cell (0.5 ms), and still few pairs (bonds to H).
_CLOSE_PAIR_SEARCH = 1.5


def close_pairs(positions, cell, pbc, min_dist: float, edges=None, name: str = "structure"):
    """Atom pairs closer than ``min_dist`` (Å), each once with its shortest image distance.

    Args:
      positions, cell, pbc: as for :func:`neighbor_list`.
      edges: ``(senders, receivers, shifts)`` of a neighbour list already built with a cutoff
        >= ``min_dist`` (reused, no second search); without it a list at cutoff
        ``max(min_dist, 1.5 A)`` is built (the smallest cheap search; it holds few pairs).

    Returns:
      ``pairs`` ``(P, 2)`` int with ``i <= j`` (``i == j``: an atom and its own periodic image) and
      ``distances`` ``(P,)``, sorted by distance.
    """
    if edges is None:
        edges = neighbor_list(positions, cell, pbc, max(min_dist, _CLOSE_PAIR_SEARCH), name)
    senders, receivers, shifts = edges
    lengths = edge_lengths(positions, cell, senders, receivers, shifts)
    close = lengths < min_dist
    if not close.any():
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    order = np.argsort(lengths[close], kind="stable")
    ij = np.sort(np.stack([receivers[close], senders[close]], axis=1), axis=1).astype(np.int64)[order]
    _, first = np.unique(ij, axis=0, return_index=True)  # in distance order, a pair's first edge is its shortest
    keep = np.sort(first)
    return ij[keep], lengths[close][order][keep]


def describe_close_pairs(pairs, distances, min_dist: float, limit: int = 3) -> str:
    """``"atoms 0 and 1 are 0.001 Å apart, ... (N pairs closer than min_pair_dist 0.1 Å)"``."""
    shown = ", ".join(f"atoms {i} and {j} are {d:.4g} Å apart" for (i, j), d in zip(pairs[:limit], distances[:limit]))
    more = f", and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return f"{shown}{more} ({len(pairs)} pair(s) closer than min_pair_dist {min_dist:g} Å)"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Static padded sizes of a batch: total nodes, edges and graphs (padding graph included)."""

    n_node: int
    n_edge: int
    n_graph: int

    def fits(self, n_node: int, n_edge: int, n_graph: int) -> bool:
        """Whether a batch of these totals fits, with one node and one graph left for padding."""
        return n_node < self.n_node and n_edge <= self.n_edge and n_graph < self.n_graph


def structure_graph(species, positions, cell, pbc, cutoff, name="structure",
                    charge_spin=(None, None)) -> jraph.GraphsTuple:
    """One structure as a single-graph ``GraphsTuple`` (NumPy arrays). ``charge_spin``: its total charge and
    spin multiplicity, for models with a charge/spin embedding (None: not given, NaN in the graph; such a model
    uses its ``default_chg_spin``)."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    senders, receivers, shifts = neighbor_list(positions, cell, pbc, cutoff, name)
    return jraph.GraphsTuple(
        nodes={"species": np.asarray(species, dtype=np.int32), "positions": positions},
        edges={"shifts": shifts},
        senders=senders,
        receivers=receivers,
        globals={"cell": np.where(pbc[:, None], cell, 0.0)[None],
                 "charge_spin": np.array([[np.nan if v is None else v for v in charge_spin]], dtype=np.float64)},
        n_node=np.array([len(positions)], dtype=np.int32),
        n_edge=np.array([len(senders)], dtype=np.int32),
    )


def atoms_graph(atoms, config, cutoff: float | None = None, name: str | None = None) -> jraph.GraphsTuple:
    """The graph of an ``ase.Atoms`` for the model of ``config`` (a ``ModelConfig``): its elements in the type
    map, its total charge and spin multiplicity from ``atoms.info`` as the model reads them
    (``ModelConfig.charge_spin``), the pairs within ``cutoff`` (default the model's ``rcut``). Errors
    (``ValueError``) name ``name`` (default the formula and size)."""
    name = name or f"{atoms.get_chemical_formula()} ({len(atoms)} atoms)"
    species = species_indices(atoms.numbers, config.type_map, name)
    charge_spin = config.charge_spin(atoms.info.get("charge"), atoms.info.get("spin"), name)
    return structure_graph(species, atoms.positions, atoms.cell.array, atoms.pbc,
                           config.rcut if cutoff is None else cutoff, name, charge_spin)


def batch(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    return jraph.batch_np(list(graphs))


def pad(graph: jraph.GraphsTuple, budget: Budget) -> jraph.GraphsTuple:
    """Pad to a static budget with one or more padding graphs (``jraph.pad_with_graphs``).

    Padding nodes get species 0 and zero positions, padding edges connect padding
    nodes with zero shift, padding graphs have a zero cell; all are masked by
    ``jraph.get_*_padding_mask`` downstream.
    """
    n_node, n_edge, n_graph = int(graph.n_node.sum()), int(graph.n_edge.sum()), len(graph.n_node)
    if not budget.fits(n_node, n_edge, n_graph):
        raise GraphError(f"batch of {n_node} nodes, {n_edge} edges, {n_graph} graphs does not fit {budget} "
                         "(one node and one graph are reserved for padding)")
    return jraph.pad_with_graphs(graph, budget.n_node, budget.n_edge, budget.n_graph)


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
