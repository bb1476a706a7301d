"""Forces of many structures at once: K structures packed into one padded multi-graph per call.

Where the ASE calculator evaluates one structure per call, :func:`forces_of_many` builds the graphs of
``batch_size`` structures, batches them (``graph.batch``) and pads the batch to one static
``graph.Budget``, so that all the batches of structures of one size (the displaced supercells of a phonon
calculation, the images of a band) share one compilation, and each call does K structures' work::

    forces = forces_of_many(calc, supercells)      # [(N_i, 3)] eV/Å, in the order given

The budget holds ``batch_size`` graphs of the largest structure with a margin on the edges; a batch that
outgrows it (a displacement that brings a pair inside the cutoff) grows it once, with a logged compilation.
Budgets are remembered per model, batch size and node count, so later lists of structures of that size (the FC2
and then the FC3 supercells, the next crystal with the same supercell size) reuse the compiled shape unless
they need more edges, or fewer than half.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpa4_jax import graph as graphs
from dpa4_jax import physics

log = logging.getLogger(__name__)

ATOMS_PER_BATCH = 512  # default batch size: about this many atoms per call
EDGE_MARGIN = 1.05  # padded edges above the first batch's largest graph (displacements move pairs in and out)
_ENERGY_FORCES_VIRIAL = jax.jit(physics.energy_forces_virial, static_argnums=0)
_BUDGETS: dict[tuple, graphs.Budget] = {}  # (model, batch size, padded nodes) -> the budget last compiled


def structure_graphs(calc, atoms_list: Sequence, first: int = 0) -> list:
    """The graphs of ``atoms_list`` for the model (``graph.atoms_graph``; ``first``: the index of
    ``atoms_list[0]`` in the caller's list, for error messages)."""
    return [graphs.atoms_graph(atoms, calc.config, name=f"structure {k} ({atoms.get_chemical_formula()}, "
                                                        f"{len(atoms)} atoms)")
            for k, atoms in enumerate(atoms_list, start=first)]


def _budget(graph_list, batch_size: int) -> graphs.Budget:
    n_node = max(int(g.n_node[0]) for g in graph_list)
    n_edge = max(int(g.n_edge[0]) for g in graph_list)
    return graphs.Budget(n_node=graphs.round_up(batch_size * n_node + 1, 8),
                         n_edge=graphs.round_up(math.ceil(batch_size * max(n_edge, 1) * EDGE_MARGIN), 64),
                         n_graph=batch_size + 1)


def forces_of_many(calc, atoms_list: Sequence, batch_size: int | None = None, progress: bool = False) -> list:
    """Forces ``(N_i, 3)`` (eV/Å, float64) of each structure of ``atoms_list`` with the model of ``calc``
    (a ``DPA4Calculator``), ``batch_size`` structures per padded call (default: about
    ``ATOMS_PER_BATCH`` atoms a call), fewer in the last call, padded to the same shape: lists of structures of
    one size compile once whatever their length (a compilation costs more than a padded call).
    ``calc.compilations`` counts the budgets compiled."""
    if not len(atoms_list):
        return []
    if batch_size is None:
        batch_size = max(1, ATOMS_PER_BATCH // max(len(a) for a in atoms_list))
    forces = []
    with tqdm(total=len(atoms_list), desc="forces", unit="structure", disable=not progress, leave=False) as bar:
        for start in range(0, len(atoms_list), batch_size):
            chunk = structure_graphs(calc, atoms_list[start:start + batch_size], start)
            needed = _budget(chunk, batch_size)
            key = (calc.model, batch_size, needed.n_node)
            budget = _BUDGETS.get(key)
            if budget is None or needed.n_edge > budget.n_edge or 2 * needed.n_edge < budget.n_edge:
                budget = _BUDGETS[key] = needed
                calc.compilations += 1
                log.info("forces_of_many: compiling for %d structures, %d nodes, %d edges (compilation %d)",
                         batch_size, budget.n_node, budget.n_edge, calc.compilations)
            padded = graphs.pad(graphs.batch(chunk), budget)
            out = _ENERGY_FORCES_VIRIAL(calc.model, calc.variables, jax.tree.map(jnp.asarray, padded))
            f = np.asarray(out["forces"], dtype=np.float64)
            offsets = np.concatenate([[0], np.cumsum([int(g.n_node[0]) for g in chunk])])
            forces += [f[a:b] for a, b in itertools.pairwise(offsets)]
            bar.update(len(chunk))
    return forces
