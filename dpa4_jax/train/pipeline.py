"""The host pipeline: labelled, padded graph batches built ahead of the training step, in worker processes.

Each item of the plan is a :class:`BatchSpec`: the frame indices of every device's sub-batch and the static
budget they are padded to. :func:`load_batches` yields one batch per item, in the plan's order whatever the
number of workers, so resuming at step ``k`` is ``load_batches(source, items[k:], ...)``. Workers (grain
processes) receive the source by pickling: a :class:`~dpa4_jax.data.store.FrameStore` travels as its path
and is re-opened there, so the data set is never copied and each worker holds only the batches it builds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import queue
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

import jax
import jraph
import numpy as np

from dpa4_jax import graph as graphs
from dpa4_jax.data import Frame
from dpa4_jax.elements import species_indices
from dpa4_jax.train import distributed
from dpa4_jax.train.data import BatchSpec

__all__ = ["BatchSpec", "build_batch", "device_batches", "labelled_graph", "load_batches", "thread_prefetch"]


def labelled_graph(frame: Frame, type_map: Sequence[str], cutoff: float) -> jraph.GraphsTuple:
    """A frame's graph with its labels: ``nodes["forces"]``, ``globals["energy"|"virial"]`` and masks."""
    species = species_indices(frame.numbers, type_map, frame.source or "frame")
    g = graphs.structure_graph(species, frame.positions, frame.cell, frame.pbc, cutoff, frame.source or "frame",
                               (frame.charge, frame.spin))
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


def thread_prefetch(make, batches: Sequence, depth: int = 3) -> Iterator[jraph.GraphsTuple]:
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


def _padded(source, indices: np.ndarray, sub: list[jraph.GraphsTuple], budget: graphs.Budget) -> jraph.GraphsTuple:
    try:
        return graphs.pad(jraph.batch_np(sub), budget)
    except graphs.GraphError as e:
        names = ", ".join(source.name(int(i)) for i in indices[:3]) + (", ..." if len(indices) > 3 else "")
        raise graphs.GraphError(f"frames {names}: {e}") from None


def build_batch(source, spec: BatchSpec, type_map: Sequence[str], cutoff: float) -> jraph.GraphsTuple:
    """The sub-batches of ``spec``, each padded to ``spec.budget``, stacked: every leaf gets a leading axis of
    length ``len(spec.frames)`` (NumPy arrays)."""
    indices = [np.asarray(idx, dtype=np.int64).reshape(-1) for idx in spec.frames]
    subs = [[labelled_graph(source[int(i)], type_map, cutoff) for i in idx] for idx in indices]
    # An empty sub-batch is a graph of no graphs, with the leaves (keys, dtypes) of a real one.
    template = next((sub[0] for sub in subs if sub), None)
    if template is None:
        template = labelled_graph(source[0], type_map, cutoff)
    empty = jax.tree.map(lambda x: x[:0], template)
    padded = [_padded(source, idx, sub or [empty], spec.budget) for idx, sub in zip(indices, subs)]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *padded)


def load_batches(source, items: Sequence[BatchSpec], type_map: Sequence[str], cutoff: float, *,
                 workers: int = 0, prefetch: int = 2) -> Iterator[jraph.GraphsTuple]:
    """Batches of ``items`` (see :func:`build_batch`) from ``source`` (a ``FrameStore`` or ``InMemoryFrames``).

    ``workers=0``: built in one background thread, ``prefetch`` ahead. ``workers > 0``: built in that many
    grain worker processes, each keeping up to ``prefetch`` finished batches; memory is
    ``O(workers * prefetch)`` batches, whatever the size of the data set. An error in a worker (a bad frame)
    is raised here, naming the frame.
    """
    if abs(source.cutoff - cutoff) > 1e-9:
        raise ValueError(f"{source}: edges were counted at cutoff {source.cutoff}, but the model's cutoff is "
                         f"{cutoff}; prepare the data again with --cutoff {cutoff}")
    build = functools.partial(build_batch, source, type_map=tuple(type_map), cutoff=float(cutoff))
    if workers == 0:
        return thread_prefetch(build, items, depth=prefetch)
    return _grain_batches(build, items, workers, prefetch)


def device_batches(source, items: Sequence[BatchSpec], mesh, type_map: Sequence[str], cutoff: float,
                   workers: int = 0) -> Iterator[jraph.GraphsTuple]:
    """:func:`load_batches` of this process's share of each step, as global batches split over ``mesh``
    (:func:`dpa4_jax.train.distributed.global_batch`)."""
    with contextlib.closing(load_batches(source, items, type_map, cutoff, workers=workers)) as batches:
        for batch in batches:
            yield distributed.global_batch(batch, mesh)


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """A worker exits when the training process dies (SIGKILL, OOM killer): without this, grain's workers
    outlive it, idle but holding their memory. Linux only (``prctl(PR_SET_PDEATHSIG)``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _grain_batches(build, items: Sequence[BatchSpec], workers: int, depth: int) -> Iterator[jraph.GraphsTuple]:
    import grain
    from absl import flags

    # grain reads absl flags (worker profiling) in the consumer; outside an absl app they are unparsed,
    # which raises UnparsedFlagAccessError. Marking them parsed leaves every flag at its default.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # Inside a worker, each batch is built synchronously (no reader threads): memory is the worker's buffer.
    dataset = (grain.MapDataset.source(list(items)).map(build)
               .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
               .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=depth),
                            worker_init_fn=_die_with_parent))
    iterator = iter(dataset)
    try:
        for batch in iterator:
            # Workers hand over shared-memory arrays, unlinked when garbage-collected; plain copies free the
            # shared memory at once and keep long-lived batches (and interpreter exit) clean.
            yield jax.tree.map(np.array, batch)
    finally:
        iterator.close()  # stops the worker processes now, not at garbage collection
