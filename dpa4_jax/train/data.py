"""Labelled graphs, batches of about K atoms, and a few static padded shapes per epoch.

Batches follow the paper's rule (S-5.2): ``ceil(K / N_atoms)`` structures; for a
data set of mixed sizes, structures are taken in shuffled order until the batch
holds at least K atoms, which is the same rule when all sizes are equal.
Batches are padded to one of ``n_budgets`` static shapes chosen from the
epoch's batch sizes, so a whole epoch compiles only that many times. Graphs are
built on the host in a background thread and cached (up to a memory limit).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import jraph
import numpy as np

from dpa4_jax import graph as graphs
from dpa4_jax.data import Frame
from dpa4_jax.elements import species_indices

log = logging.getLogger(__name__)


def labelled_graph(frame: Frame, type_map: Sequence[str], cutoff: float) -> jraph.GraphsTuple:
    """A frame's graph with its labels: ``nodes["forces"]``, ``globals["energy"|"virial"]`` and masks."""
    species = species_indices(frame.numbers, type_map, frame.source or "frame")
    g = graphs.structure_graph(species, frame.positions, frame.cell, frame.pbc, cutoff, frame.source or "frame")
    n = frame.natoms
    has_forces = frame.forces is not None
    nodes = dict(g.nodes, forces=np.zeros((n, 3)) if not has_forces else np.asarray(frame.forces, np.float64),
                 force_mask=np.full((n,), has_forces))
    glob = dict(g.globals,
                energy=np.array([frame.energy if frame.energy is not None else 0.0]),
                energy_mask=np.array([frame.energy is not None]),
                virial=np.zeros((1, 3, 3)) if frame.virial is None else np.asarray(frame.virial, np.float64)[None],
                virial_mask=np.array([frame.virial is not None]))
    return g._replace(nodes=nodes, globals=glob, edges={"shifts": g.edges["shifts"].astype(np.int32)})


def batch_plan(n_atoms: np.ndarray, batch_atoms: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the frames and cut them into batches of at least ``batch_atoms`` atoms (the last may be smaller)."""
    order = rng.permutation(len(n_atoms))
    batches, current, atoms = [], [], 0
    for i in order:
        current.append(i)
        atoms += n_atoms[i]
        if atoms >= batch_atoms:
            batches.append(np.array(current))
            current, atoms = [], 0
    if current:
        batches.append(np.array(current))
    return batches


@dataclasses.dataclass(frozen=True)
class BatchSize:
    n_node: int
    n_edge: int
    n_graph: int

    def fits(self, budget: graphs.Budget) -> bool:
        # One node and one graph are reserved for padding.
        return self.n_node < budget.n_node and self.n_edge <= budget.n_edge and self.n_graph < budget.n_graph


def plan_budgets(sizes: Sequence[BatchSize], n_budgets: int, margin: float = 1.05) -> list[graphs.Budget]:
    """At most ``n_budgets`` padded shapes covering ``sizes``: the batches sorted by edge count are cut into
    groups of equal count, and each group's budget is its maximum (plus a margin against the next epochs)."""
    ordered = sorted(sizes, key=lambda s: (s.n_edge, s.n_node))
    groups = np.array_split(np.arange(len(ordered)), min(n_budgets, len(ordered)))
    budgets = []
    for g in groups:
        members = [ordered[i] for i in g]
        budgets.append(graphs.Budget(
            n_node=graphs.round_up(math.ceil(max(s.n_node for s in members) * margin) + 1, 8),
            n_edge=graphs.round_up(math.ceil(max(s.n_edge for s in members) * margin), 256),
            n_graph=math.ceil(max(s.n_graph for s in members) * margin) + 1))
    return sorted(set(budgets), key=lambda b: (b.n_edge, b.n_node))


class GraphDataset:
    """Frames with their neighbour graphs, built lazily (thread-safe) and cached up to ``cache_mb``."""

    def __init__(self, frames: Sequence[Frame], type_map: Sequence[str], cutoff: float, cache_mb: float = 4096):
        self.frames = list(frames)
        self.type_map, self.cutoff = tuple(type_map), cutoff
        self.n_atoms = np.array([f.natoms for f in self.frames])
        self._cache: dict[int, jraph.GraphsTuple] = {}
        self._cache_bytes, self._cache_limit = 0, cache_mb * 2**20
        self._lock = threading.Lock()
        self._n_edges: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def graph(self, i: int) -> jraph.GraphsTuple:
        g = self._cache.get(i)
        if g is None:
            g = labelled_graph(self.frames[i], self.type_map, self.cutoff)
            size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(g))
            with self._lock:
                if self._cache_bytes + size <= self._cache_limit:
                    self._cache[i] = g
                    self._cache_bytes += size
        return g

    def n_edges(self, progress: bool = False) -> np.ndarray:
        """Edge count of every frame (computed once; builds, and caches, the graphs)."""
        if self._n_edges is None:
            from tqdm.auto import tqdm

            it = tqdm(range(len(self)), desc="neighbour lists", unit="frame", disable=not progress, leave=False)
            self._n_edges = np.array([int(self.graph(i).n_edge[0]) for i in it])
        return self._n_edges

    def size_of(self, batch: np.ndarray) -> BatchSize:
        return BatchSize(int(self.n_atoms[batch].sum()), int(self.n_edges()[batch].sum()), len(batch))

    def padded_batch(self, batch: np.ndarray, budget: graphs.Budget) -> jraph.GraphsTuple:
        return graphs.pad(jraph.batch_np([self.graph(int(i)) for i in batch]), budget)


class Batcher:
    """Assigns each batch the smallest budget that fits it (adding one when none does, which costs a
    compilation) and keeps statistics of the padding."""

    def __init__(self, dataset: GraphDataset, budgets: Sequence[graphs.Budget]):
        self.dataset = dataset
        self.budgets = sorted(budgets, key=lambda b: (b.n_edge, b.n_node))
        self.padded_edges = self.real_edges = self.padded_nodes = self.real_nodes = 0

    def budget_for(self, size: BatchSize) -> graphs.Budget:
        for b in self.budgets:
            if size.fits(b):
                return b
        new = graphs.Budget(graphs.round_up(math.ceil(size.n_node * 1.1) + 1, 8),
                            graphs.round_up(math.ceil(size.n_edge * 1.1), 256), size.n_graph + 2)
        log.info("new padded shape %s for a batch of %s (one more compilation)", new, size)
        self.budgets.append(new)
        self.budgets.sort(key=lambda b: (b.n_edge, b.n_node))
        return new

    def make(self, batch: np.ndarray) -> jraph.GraphsTuple:
        size = self.dataset.size_of(batch)
        budget = self.budget_for(size)
        self.real_edges += size.n_edge
        self.padded_edges += budget.n_edge
        self.real_nodes += size.n_node
        self.padded_nodes += budget.n_node
        return self.dataset.padded_batch(batch, budget)

    @property
    def padding_waste(self) -> float:
        """Fraction of padded edge slots that held no real edge."""
        return 1.0 - self.real_edges / max(self.padded_edges, 1)


def prefetch(make, batches: Sequence[np.ndarray], depth: int = 3) -> Iterator[jraph.GraphsTuple]:
    """Build batches in a background thread, ``depth`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put(make(b))
        except BaseException as e:  # surface errors (bad frames) in the consumer
            q.put(e)
            return
        q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
