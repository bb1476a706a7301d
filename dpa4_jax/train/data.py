"""Labelled graphs, per-device batches of about K atoms, global steps, and a few static padded shapes.

Per-device batches ("sub-batches") follow the paper's rule (S-5.2): ``ceil(K / N_atoms)``
structures per device; for a data set of mixed sizes, structures are taken in
shuffled order until the sub-batch holds at least K atoms, which is the same
rule when all sizes are equal. A global step takes ``sub_batches`` consecutive
sub-batches (one or more per device), all padded to one of ``n_budgets`` static
shapes chosen from the epoch's step sizes, so a whole run compiles only that many
times. Planning needs only the frames' atom and edge counts, never a graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from dpa4_jax import graph as graphs
from dpa4_jax.data import Frame

log = logging.getLogger(__name__)


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
        return budget.fits(self.n_node, self.n_edge, self.n_graph)


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


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One step's share of this process: frame indices per sub-batch (an empty array is an all-padding
    sub-batch), all padded to ``budget``."""

    frames: tuple[np.ndarray, ...]
    budget: graphs.Budget


class Subset:
    """The frames ``indices`` of a frame source (a validation split, a capped set), itself a source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.n_atoms, self.n_edges = source.n_atoms[self.indices], source.n_edges[self.indices]
        self.cutoff = source.cutoff

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Frame:
        return self.source[int(self.indices[i])]

    def name(self, i: int) -> str:
        return self.source.name(int(self.indices[i]))

    def composition(self, i: int):
        return self.source.composition(int(self.indices[i]))


def step_size(sizes: Sequence[BatchSize]) -> BatchSize:
    """The padded shape that a step's sub-batches share: the largest of each count."""
    return BatchSize(max(s.n_node for s in sizes), max(s.n_edge for s in sizes), max(s.n_graph for s in sizes))


def size_of(frames: np.ndarray, n_atoms: np.ndarray, n_edges: np.ndarray) -> BatchSize:
    return BatchSize(int(n_atoms[frames].sum()), int(n_edges[frames].sum()), len(frames))


def epoch_steps(n_atoms: np.ndarray, batch_atoms: int, sub_batches: int, seed: int, epoch: int,
                start: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The global steps of one epoch from sub-batch ``start`` on: groups of ``sub_batches`` sub-batches
    (frame indices); the last group is completed with empty sub-batches (all padding)."""
    subs = batch_plan(n_atoms, batch_atoms, np.random.default_rng([seed, epoch]))[start:]
    subs += [np.zeros(0, np.int64)] * (-len(subs) % sub_batches)
    return [tuple(subs[i:i + sub_batches]) for i in range(0, len(subs), sub_batches)]


class Batcher:
    """Gives each step the smallest budget that fits all its sub-batches (adding one when none does, which
    costs a compilation, never a truncation) and keeps statistics of the padding."""

    def __init__(self, n_atoms: np.ndarray, n_edges: np.ndarray, budgets: Sequence[graphs.Budget]):
        self.n_atoms, self.n_edges = n_atoms, n_edges
        self.budgets = sorted(budgets, key=lambda b: (b.n_edge, b.n_node))
        self.padded_edges = self.real_edges = 0

    @classmethod
    def planned(cls, n_atoms, n_edges, steps: Sequence[tuple[np.ndarray, ...]], n_budgets: int) -> "Batcher":
        """Budgets fitted to ``steps`` (an epoch's plan)."""
        sizes = [step_size([size_of(f, n_atoms, n_edges) for f in step]) for step in steps]
        return cls(n_atoms, n_edges, plan_budgets(sizes, n_budgets))

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

    def spec(self, step: tuple[np.ndarray, ...], local: slice) -> BatchSpec:
        """What this process loads for ``step``: its sub-batches (``local``), padded to the step's budget."""
        sizes = [size_of(f, self.n_atoms, self.n_edges) for f in step]
        budget = self.budget_for(step_size(sizes))
        self.real_edges += sum(s.n_edge for s in sizes)
        self.padded_edges += budget.n_edge * len(step)
        return BatchSpec(tuple(step[local]), budget)

    def specs(self, steps: Sequence[tuple[np.ndarray, ...]], local: slice) -> list[BatchSpec]:
        """:meth:`spec` of each of ``steps``."""
        return [self.spec(step, local) for step in steps]

    @property
    def padding_waste(self) -> float:
        """Fraction of padded edge slots that held no real edge."""
        return 1.0 - self.real_edges / max(self.padded_edges, 1)
