"""``relax``: many structures relaxed at once, each on the path of ASE's ``FIRE(FrechetCellFilter(atoms))``.

The structures wait in a queue; the batch (one per local device) holds as many as its padded budget takes, and
one compiled call (:mod:`dpa4_jax.relax.step`) evaluates the model and moves all of them by one FIRE step. A
structure that has converged or used up its steps leaves, and the queue refills its room, so the batch stays
full. Neighbour lists are built on the host at ``rcut + skin`` and rebuilt for a structure as soon as the step
reports that it could have missed a pair within rcut. The budget is fixed from the first structures and grows
(one more compilation) only for a structure too large for an empty batch; a structure whose rebuilt list no
longer fits waits outside, with its state, for room.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress
from tqdm.auto import tqdm

from dpa4_jax import graph as graphs
from dpa4_jax.relax import journal as journals
from dpa4_jax.relax import slots as slot_ops
from dpa4_jax.relax.fire import FireParameters
from dpa4_jax.relax.step import WithinCutoff, compiled_step
from dpa4_jax.train import distributed

log = logging.getLogger(__name__)

LOOKAHEAD = 32  # queued structures looked at for one that fits the room left in a batch
EDGE_MARGIN = 1.15  # the edge budget over the mean edges per atom of the first structures, times the atoms
_COMPILED_BUDGETS: set = set()  # (step function, budget) pairs compiled in this process


class Relaxed(list):
    """The relaxed structures in input order, with counters of the run: ``compilations``, ``iterations``
    (batched steps), ``steps`` (FIRE steps summed over structures), ``rebuilds`` (neighbour lists built again),
    ``seconds``, ``errors`` ({index: message})."""

    compilations: int = 0
    iterations: int = 0
    steps: int = 0
    rebuilds: int = 0
    seconds: float = 0.0
    errors: dict


@dataclasses.dataclass
class _Batch:
    """The slots on one device, in packing order (host copies: the device state runs ahead of them until the
    next event, when the batch is unpacked, changed and pushed again)."""

    slots: list
    atoms: int = 0
    edges: int = 0

    def add(self, slot) -> None:
        n, e = slot_ops.size(slot)
        self.slots.append(slot)
        self.atoms, self.edges = self.atoms + n, self.edges + e

    def room(self, slot, budget: graphs.Budget) -> bool:
        n, e = slot_ops.size(slot)
        return budget.fits(self.atoms + n, self.edges + e, len(self.slots) + 1)


def default_skin() -> float:
    """0.1 A on CPU, 0.5 A on an accelerator. Every pair in the list costs a full edge of the model, masked or not:
    on CPU the model's step dwarfs a host rebuild, so a thin skin is cheaper (demo model, 40 MPtrj-like crystals:
    106 s of CPU at 0.1 A, 128 s at 0.5 A); on an accelerator the host round trips weigh more (not measured)."""
    return 0.1 if jax.default_backend() == "cpu" else 0.5


def default_batch_atoms() -> int:
    """512 atoms per batch on CPU, 8192 on an accelerator."""
    return 512 if jax.default_backend() == "cpu" else 8192


def relax(calc, structures: Sequence[Atoms], fmax: float = 0.05, max_steps: int = 500, cell_filter: bool = True, *,
          scalar_pressure: float = 0.0, exp_cell_factor: float | None = None, fire: FireParameters = FireParameters(),
          skin: float | None = None, batch_atoms: int | None = None, batch_edges: int | None = None,
          max_structures: int | None = None, devices=None,
          journal: str | None = None, on_result: Callable[[int, Atoms], None] | None = None,
          progress: bool = True) -> Relaxed:
    """Relax ``structures`` with the model of a ``DPA4Calculator``, many at a time.

    Each structure follows ``FIRE(FrechetCellFilter(atoms, exp_cell_factor=..., scalar_pressure=...))`` (or, with
    ``cell_filter=False``, ``FIRE(atoms)``) run as ``opt.run(fmax, steps=max_steps)`` with ``calc``.

    Args:
      calc: a :class:`dpa4_jax.calculator.DPA4Calculator` (its model, weights, dtype and ``min_pair_dist``).
      structures: ``ase.Atoms``; with the cell filter they must be periodic in all three directions.
      skin: neighbour lists hold pairs up to ``rcut + skin`` (Å) and are rebuilt before they could miss one
        (default :func:`default_skin`).
      batch_atoms: atoms per batch and device (default :func:`default_batch_atoms`); ``batch_edges``: edges
        per batch (default: ``EDGE_MARGIN`` times the mean edges per atom of the first structures, times
        ``batch_atoms``); ``max_structures``: structures per batch (default ``batch_atoms // 8``).
      devices: the local devices to share the batches (default all of this process's).
      journal: a file that receives each result as it comes; a run started again with it skips those.
      on_result: called with ``(index, relaxed atoms)`` as each structure finishes.

    Returns:
      :class:`Relaxed`: per input structure a copy with the relaxed positions and cell, a
      ``SinglePointCalculator`` (energy, forces and, fully periodic, stress), ``info["steps"]`` (ASE's
      ``Optimizer.nsteps``) and ``info["converged"]``. A structure that cannot be relaxed (see
      :func:`dpa4_jax.relax.slots.new_slot`; or a non-finite energy on the way) is reported (logged, and in
      ``info["error"]`` and ``errors``) and does not stop the others.
    """
    start = time.perf_counter()
    structures = list(structures)
    settings = {"fmax": fmax, "max_steps": max_steps, "cell_filter": cell_filter, "scalar_pressure": scalar_pressure,
                "exp_cell_factor": exp_cell_factor, "fire": dataclasses.asdict(fire)}
    book = journals.Journal(journal, settings) if journal is not None else None
    results: list[Atoms | None] = [None] * len(structures)
    keys = [journals.fingerprint(a) for a in structures] if book else None
    for i in range(len(structures)):
        record = book.check(i, keys[i]) if book else None
        if record is not None:
            results[i] = journals.result_atoms(structures[i], record)

    mesh = distributed.data_mesh(jax.local_devices() if devices is None else devices)
    batch_atoms = batch_atoms or default_batch_atoms()
    skin = default_skin() if skin is None else skin
    run = _Run(calc, structures, cell_filter, exp_cell_factor, fire, skin, mesh, batch_atoms, batch_edges,
               max_structures or max(1, batch_atoms // 8))
    bar = tqdm(total=len(structures), initial=sum(r is not None for r in results), desc="relaxing", unit="structure",
               disable=not progress)

    def finish(index: int, record: dict) -> None:
        record = dict(record, index=index, key=keys[index] if keys else "")
        results[index] = journals.result_atoms(structures[index], record)
        if record.get("error"):
            log.warning("%s", record["error"])
        if book:
            book.write(record)
        if on_result is not None:
            on_result(index, results[index])
        bar.update()
        bar.set_postfix({"steps/s": f"{run.steps / max(time.perf_counter() - start, 1e-9):.0f}",
                         "compilations": run.compilations}, refresh=False)

    try:
        run.loop(collections.deque(i for i, r in enumerate(results) if r is None), finish,
                 {"fmax": fmax, "max_steps": max_steps, "scalar_pressure": scalar_pressure})
    finally:
        bar.close()
        if book:
            book.close()
    out = Relaxed(results)
    out.compilations, out.iterations, out.steps, out.rebuilds = run.compilations, run.iterations, run.steps, run.rebuilds
    out.seconds = time.perf_counter() - start
    out.errors = {i: r.info["error"] for i, r in enumerate(results) if "error" in r.info}
    return out


class _Run:
    """The queue, the batches on the devices, and the loop of one :func:`relax` call."""

    def __init__(self, calc, structures, cell_filter, exp_cell_factor, fire, skin, mesh, batch_atoms, batch_edges,
                 max_structures):
        self.calc, self.structures, self.mesh = calc, structures, mesh
        self.rcut, self.skin = float(calc.config.rcut), float(skin)
        self.slot_options = dict(config=calc.config, rcut=self.rcut, skin=self.skin,
                                 cell_filter=cell_filter, exp_cell_factor=exp_cell_factor,
                                 min_pair_dist=calc.min_pair_dist, fire=fire, dtype=np.dtype(calc.model.param_dtype))
        self.step = compiled_step(WithinCutoff(calc.model, self.rcut), cell_filter, self.skin, fire, mesh)
        self.batch_atoms, self.batch_edges, self.max_structures = batch_atoms, batch_edges, max_structures
        self.n_devices = mesh.devices.size
        self.budget: graphs.Budget | None = None
        self.compilations = self.iterations = self.steps = self.rebuilds = 0

    # ---------------------------------------------------------------------------------------- the queue
    def _prepare(self, queue, waiting, finish, count: int) -> None:
        """Move structures from ``queue`` to ``waiting`` (as new slots) until ``count`` wait; bad ones finish."""
        while len(waiting) < count and queue:
            index = queue.popleft()
            try:
                waiting.append(slot_ops.new_slot(self.structures[index], index, **self.slot_options))
            except slot_ops.StructureError as error:
                finish(index, {"error": str(error), "steps": 0, "converged": False})

    def _plan(self, waiting) -> graphs.Budget:
        """A budget for ``batch_atoms`` atoms with the edge density of the waiting slots, large enough for
        the largest of them."""
        sizes = np.array([slot_ops.size(s) for s in waiting], dtype=np.float64).reshape(-1, 2)
        n_node = graphs.round_up(max(self.batch_atoms, sizes[:, 0].max()) + 1, 8)
        density = sizes[:, 1].sum() / sizes[:, 0].sum()
        wanted = self.batch_edges or math.ceil(density * (n_node - 1) * EDGE_MARGIN)
        n_edge = graphs.round_up(max(wanted, sizes[:, 1].max(), 1), 64)
        return graphs.Budget(n_node, n_edge, max(self.max_structures, 1) + 1)

    def _grow(self, slot) -> None:
        n, e = slot_ops.size(slot)
        b = self.budget
        self.budget = graphs.Budget(max(b.n_node, graphs.round_up(n + 1, 8)),
                                    max(b.n_edge, graphs.round_up(math.ceil(e * EDGE_MARGIN), 64)), b.n_graph)
        log.info("relax: a structure of %d atoms and %d edges outgrows the batch: budget %s", n, e, self.budget)

    def _fill(self, batches, waiting, queue, finish) -> None:
        """Add waiting slots (in order, looking ``LOOKAHEAD`` ahead) to the emptiest batches while they fit."""
        for batch in sorted(batches, key=lambda b: b.atoms):
            while True:
                self._prepare(queue, waiting, finish, LOOKAHEAD)
                fits = next((k for k, s in enumerate(waiting) if batch.room(s, self.budget)), None)
                if fits is None:
                    if waiting and not batch.slots:  # too large for an empty batch: grow (a compilation)
                        self._grow(waiting[0])
                        continue
                    break
                batch.add(waiting[fits])
                del waiting[fits]

    # ---------------------------------------------------------------------------------------- device state
    def _push(self, batches):
        budget = self.budget
        key = (self.step, budget)
        if key not in _COMPILED_BUDGETS:
            _COMPILED_BUDGETS.add(key)
            self.compilations += 1
            log.info("relax: compiling for batches of %d atoms, %d edges, %d structures (compilation %d)",
                     budget.n_node - 1, budget.n_edge, budget.n_graph - 1, self.compilations)
        template = next(b.slots[0] for b in batches if b.slots)
        packed = [slot_ops.pack(b.slots, budget) if b.slots else slot_ops.pack_empty(template, budget)
                  for b in batches]
        stacked = jax.tree.map(lambda *t: np.stack(t), *packed)
        return distributed.global_batch(stacked, self.mesh)

    def loop(self, queue: collections.deque, finish, settings: dict) -> None:
        dtype = self.slot_options["dtype"]
        settings = distributed.replicate({"fmax": np.asarray(settings["fmax"], dtype),
                                          "max_steps": np.asarray(settings["max_steps"], np.int32),
                                          "scalar_pressure": np.asarray(settings["scalar_pressure"], dtype)}, self.mesh)
        variables = distributed.replicate(self.calc.variables, self.mesh)
        waiting: list = []
        self._prepare(queue, waiting, finish, max(LOOKAHEAD, 2 * self.n_devices))
        if not waiting:
            return
        self.budget = self._plan(waiting)
        batches = [_Batch([]) for _ in range(self.n_devices)]
        self._fill(batches, waiting, queue, finish)
        state = self._push(batches)
        while any(b.slots for b in batches):
            state, report = self.step(variables, state, settings)
            finished, valid = jax.device_get((report["finished"], report["list_valid"]))
            self.iterations += 1
            events = False
            for d, batch in enumerate(batches):
                k = len(batch.slots)
                self.steps += int(np.sum(~finished[d, :k]))
                events |= bool(finished[d, :k].any() or (~valid[d, :k]).any())
            if events:
                batches, state = self._update(batches, state, report, waiting, queue, finish)

    def _update(self, batches, state, report, waiting, queue, finish):
        """Finished structures leave, stale lists are rebuilt, the queue refills the room; a new device state."""
        host_state, host_report = jax.tree.map(np.array, jax.device_get((state, report)))  # writable copies
        cutoff = self.rcut + self.skin
        new_batches, parked = [], []
        for d, batch in enumerate(batches):
            sub_state = jax.tree.map(lambda t: t[d], host_state)
            rows = jax.tree.map(lambda t: t[d], host_report)
            kept = _Batch([])
            node_start = np.concatenate([[0], np.cumsum(sub_state.n_node)])
            for k, slot in enumerate(slot_ops.unpack(sub_state, len(batch.slots))):
                index = int(slot.globals["index"][0])
                if rows["finished"][k]:
                    finish(index, _record(rows, k, node_start, slot))
                    continue
                if not rows["list_valid"][k]:
                    slot = slot_ops.rebuild(slot, cutoff)
                    self.rebuilds += 1
                (kept.add if kept.room(slot, self.budget) else parked.append)(slot)
            new_batches.append(kept)
        waiting[:0] = parked  # parked slots first: they were in the batch before the new ones
        self._fill(new_batches, waiting, queue, finish)
        if not any(b.slots for b in new_batches):
            return new_batches, None
        return new_batches, self._push(new_batches)


def _record(rows: dict, k: int, node_start, slot) -> dict:
    """The result record of graph ``k`` of a sub-batch's report."""
    n = slice(int(node_start[k]), int(node_start[k + 1]))
    steps = int(slot.globals["steps"][0])
    if not rows["finite"][k]:
        index = int(slot.globals["index"][0])
        return {"error": f"structure {index}: non-finite energy, forces or stress after {steps} steps",
                "steps": steps, "converged": False}
    return {"steps": steps, "converged": bool(rows["converged"][k]), "energy": float(rows["energy"][k]),
            "forces": np.asarray(rows["forces"][n], np.float64).tolist(),
            "positions": np.asarray(rows["positions"][n], np.float64).tolist(),
            "cell": np.asarray(rows["cell"][k], np.float64).tolist(),
            "stress": (full_3x3_to_voigt_6_stress(np.asarray(rows["stress"][k], np.float64)).tolist()
                       if slot.globals["pbc"][0].all() else None)}
