"""Energy, forces, virial and stress of a padded batch of graphs (paper Eq. 1, 44).

Everything comes from one scalar energy: the model sees positions and cells
only through the edge vectors, so one reverse pass gives ``g_e = dE/dr_e`` and

    F_k = sum_{e: receiver=k} g_e - sum_{e: sender=k} g_e
    W   = -sum_e g_e (x) r_e          (virial, per graph)
    sigma = -W / V                    (ASE stress sign: positive under tension)

which equals the strain derivative ``W = -dE/d(eps)`` of a homogeneous
deformation of positions and cell.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import jraph


def edge_vectors(graph: jraph.GraphsTuple, positions: jnp.ndarray | None = None) -> jnp.ndarray:
    """``(E, 3)`` vectors ``x[sender] - x[receiver] + shift @ cell[graph of edge]``."""
    positions = graph.nodes["positions"] if positions is None else positions
    cell = graph.globals["cell"].astype(positions.dtype)[_edge_graph(graph)]
    shift = jnp.einsum("ei,eij->ej", graph.edges["shifts"].astype(positions.dtype), cell)
    return positions[graph.senders] - positions[graph.receivers] + shift


def node_graph(graph):
    """``(N,)`` the graph of each node."""
    return jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_node, total_repeat_length=graph.nodes["species"].shape[0])


def _edge_graph(graph):
    return jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_edge, total_repeat_length=graph.senders.shape[0])


def atomic_energies(model, variables: Any, graph: jraph.GraphsTuple, edge_vec: jnp.ndarray,
                    edge_gamma: jnp.ndarray | None = None) -> jnp.ndarray:
    """``(N,)`` per-atom energies, exactly zero on padding nodes (``edge_gamma``: ``DPA4``'s frame rolls)."""
    node_mask = jraph.get_node_padding_mask(graph)
    edge_mask = jraph.get_edge_padding_mask(graph)
    charge_spin = graph.globals.get("charge_spin")  # per graph -> per atom (models with a charge/spin embedding)
    if charge_spin is not None:
        charge_spin = charge_spin[node_graph(graph)]
    energies = model.apply(variables, graph.nodes["species"], edge_vec, graph.senders, graph.receivers, edge_mask,
                           edge_gamma=edge_gamma, charge_spin=charge_spin)
    return jnp.where(node_mask, energies, 0.0)


def energy(model, variables, graph: jraph.GraphsTuple) -> jnp.ndarray:
    """``(G,)`` total energy per graph (zero for padding graphs)."""
    e = atomic_energies(model, variables, graph, edge_vectors(graph))
    return jax.ops.segment_sum(e, node_graph(graph), graph.n_node.shape[0])


def energy_forces_virial(model, variables, graph: jraph.GraphsTuple,
                         edge_gamma: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
    """Energies ``(G,)``, per-atom energies ``(N,)``, forces ``(N, 3)``, virials and ASE stresses ``(G, 3, 3)``.

    Stress is zero for graphs without a cell (molecules and padding graphs). ``edge_gamma`` ``(E,)``:
    random rolls of the edge frames (training with ``random_gamma``; none at inference).
    """
    n_graph = graph.n_node.shape[0]
    n_node = graph.nodes["species"].shape[0]
    vec = edge_vectors(graph)

    def total(v):
        e = atomic_energies(model, variables, graph, v, edge_gamma)
        return jnp.sum(e), e

    grad, atom_e = jax.grad(total, has_aux=True)(vec)
    forces = (jax.ops.segment_sum(grad, graph.receivers, n_node)
              - jax.ops.segment_sum(grad, graph.senders, n_node))
    virial = -jax.ops.segment_sum(grad[:, :, None] * vec[:, None, :], _edge_graph(graph), n_graph)
    volume = jnp.abs(jnp.linalg.det(graph.globals["cell"].astype(vec.dtype)))
    has_cell = volume > 0.0
    symmetric = 0.5 * (virial + jnp.swapaxes(virial, 1, 2))
    stress = jnp.where(has_cell[:, None, None], -symmetric / jnp.where(has_cell, volume, 1.0)[:, None, None], 0.0)
    return {
        "energy": jax.ops.segment_sum(atom_e, node_graph(graph), n_graph),
        "energies": atom_e,
        "forces": forces,
        "virial": virial,
        "stress": stress,
    }


@functools.partial(jax.jit, static_argnums=0, static_argnames="chunk_size")
def hessian(model, variables, graph: jraph.GraphsTuple, chunk_size: int = 4, n_columns=None) -> jnp.ndarray:
    """``(3N, 3N)`` second derivative of the total energy in the node positions, ``H[3i+a, 3j+b] =
    d^2 E / dx_ia dx_jb`` (eV/Å^2), N the padded node count; rows and columns of padding nodes are zero.

    Forward over reverse: column ``k`` is the directional derivative of the gradient ``dE/dx`` along the unit
    vector ``e_k`` (one ``jvp`` of the reverse pass). The 3N columns are computed ``chunk_size`` at a time
    (a loop over ``vmap``-ed chunks), so memory is ``chunk_size`` times that of one gradient, whatever N.
    ``n_columns`` (traced: no new compilation): compute the first ``n_columns`` columns only, the rest left zero
    (``3 * n_atoms`` skips the padding nodes' columns, which are zero).
    Periodic images enter as they do for the forces: through the edge vectors ``x[s] - x[r] + shift @ cell``
    (an atom moves with all its images; an edge from an atom to its own image has a constant vector).
    The matrix is symmetric up to round-off; for a structure it is the supercell force-constant matrix
    ``Phi_ia,jb`` of phonopy.
    """
    positions = graph.nodes["positions"]
    n_coord = positions.size

    def total(x):
        return jnp.sum(atomic_energies(model, variables, graph, edge_vectors(graph, x)))

    gradient = jax.grad(total)

    def column(k):
        tangent = jax.nn.one_hot(k, n_coord, dtype=positions.dtype).reshape(positions.shape)
        return jax.jvp(gradient, (positions,), (tangent,))[1].reshape(-1)

    def chunk(i, columns):  # columns past n_coord have a zero tangent: one loop body, no remainder
        start = i * chunk_size
        return jax.lax.dynamic_update_slice(columns, jax.vmap(column)(start + jnp.arange(chunk_size)),
                                            (start, jnp.zeros_like(start)))

    n_chunks = -(-n_coord // chunk_size)
    todo = n_chunks if n_columns is None else (n_columns + chunk_size - 1) // chunk_size
    columns = jax.lax.fori_loop(0, todo, chunk, jnp.zeros((n_chunks * chunk_size, n_coord), positions.dtype))
    return columns[:n_coord].T
