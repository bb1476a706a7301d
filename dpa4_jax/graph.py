"""Host-side graphs: neighbour lists, ``jraph.GraphsTuple`` batches and static padding.

A graph holds, per node, the ``species`` (type index) and ``positions``; per edge,
the integer image ``shifts`` of the sender; per graph, the ``cell``. Edge vectors
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


@dataclasses.dataclass(frozen=True)
class Budget:
    """Static padded sizes of a batch: total nodes, edges and graphs (padding graph included)."""

    n_node: int
    n_edge: int
    n_graph: int


def structure_graph(species, positions, cell, pbc, cutoff, name="structure") -> jraph.GraphsTuple:
    """One structure as a single-graph ``GraphsTuple`` (NumPy arrays)."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    senders, receivers, shifts = neighbor_list(positions, cell, pbc, cutoff, name)
    return jraph.GraphsTuple(
        nodes={"species": np.asarray(species, dtype=np.int32), "positions": positions},
        edges={"shifts": shifts},
        senders=senders,
        receivers=receivers,
        globals={"cell": np.where(pbc[:, None], cell, 0.0)[None]},
        n_node=np.array([len(positions)], dtype=np.int32),
        n_edge=np.array([len(senders)], dtype=np.int32),
    )


def batch(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    return jraph.batch_np(list(graphs))


def pad(graph: jraph.GraphsTuple, budget: Budget) -> jraph.GraphsTuple:
    """Pad to a static budget with one or more padding graphs (``jraph.pad_with_graphs``).

    Padding nodes get species 0 and zero positions, padding edges connect padding
    nodes with zero shift, padding graphs have a zero cell; all are masked by
    ``jraph.get_*_padding_mask`` downstream.
    """
    n_node, n_edge, n_graph = int(graph.n_node.sum()), int(graph.n_edge.sum()), len(graph.n_node)
    if n_node >= budget.n_node or n_edge > budget.n_edge or n_graph >= budget.n_graph:
        raise GraphError(f"batch of {n_node} nodes, {n_edge} edges, {n_graph} graphs does not fit {budget} "
                         "(one node and one graph are reserved for padding)")
    return jraph.pad_with_graphs(graph, budget.n_node, budget.n_edge, budget.n_graph)


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
