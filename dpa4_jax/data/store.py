"""An on-disk frame store for data sets larger than memory, and an in-memory source with the same interface.

A store is one directory of raw little-endian arrays, memory-mapped as NumPy arrays, plus ``meta.json`` (format
version, cutoff, sources, counts, and each array's dtype and shape). Frames are concatenated along the atom
axis; ``atom_start[i]:atom_start[i + 1]`` are frame ``i``'s atoms::

    numbers (A,) uint8 | positions, forces (A, 3) float64 | atom_start (F + 1,) int64
    cell, virial (F, 3, 3) float64 | pbc (F, 3) bool | energy (F,) float64
    has_energy, has_forces, has_virial (F,) bool | n_edges (F,) int64 | charge_spin (F, 2) float64 (NaN: none)
    name_bytes (B,) uint8 (UTF-8 frame sources) | name_start (F + 1,) int64

Why memmaps: random access without copying or parsing (a frame is a few slices), no dependency, the page
cache is shared by the worker processes of the host pipeline, and a store on a shared filesystem serves
several hosts. Raw files rather than ``.npy``: they are written in one streaming pass, before their length
is known. ``n_edges`` (directed edges within the store's cutoff, from :func:`dpa4_jax.graph.neighbor_list`)
lets batches be planned without a single neighbour list at training time.
"""

from __future__ import annotations

import collections
import datetime
import functools
import itertools
import json
import mmap
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dpa4_jax.graph import neighbor_list

from .frame import Frame
from .readers import read_frames

__all__ = ["FrameStore", "InMemoryFrames", "prepare", "count_edges", "STORE_VERSION"]

STORE_VERSION = 1
_PER_ATOM = {"numbers": ("u1", ()), "positions": ("<f8", (3,)), "forces": ("<f8", (3,))}
_PER_FRAME = {"cell": ("<f8", (3, 3)), "pbc": ("|b1", (3,)), "energy": ("<f8", ()), "virial": ("<f8", (3, 3)),
              "has_energy": ("|b1", ()), "has_forces": ("|b1", ()), "has_virial": ("|b1", ()),
              "charge_spin": ("<f8", (2,))}  # total charge and spin multiplicity, NaN where not given


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- edge counts in worker processes

def count_edges(structures: Sequence[tuple], cutoff: float) -> np.ndarray:
    """Directed edge counts ``(n,)`` int64 of ``(name, positions, cell, pbc)`` tuples at ``cutoff``."""
    return np.array([len(neighbor_list(pos, cell, pbc, cutoff, name)[0]) for name, pos, cell, pbc in structures],
                    dtype=np.int64)


def ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``map(fn, tasks)`` in ``workers`` processes (inline for 0), in order, with at most ``2 * workers`` tasks
    in flight: ``tasks`` is consumed lazily, so a stream of any length needs bounded memory."""
    if workers <= 0:
        yield from map(fn, tasks)
        return
    # spawn, not fork: the parent may hold JAX's threads, which a fork would copy in an undefined state.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: collections.deque = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _structures(frames: Sequence[Frame]) -> list[tuple]:
    return [(f.source or "frame", f.positions, f.cell, f.pbc) for f in frames]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --------------------------------------------------------------------------- reading a store

def _mapped_array(path: Path, dtype: str, shape: tuple) -> np.ndarray:
    if int(np.prod(shape)) == 0:  # mmap refuses empty files
        return np.zeros(shape, dtype)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise ValueError(f"{path}: {size} bytes, expected {expected} for {dtype} {list(shape)} (truncated store?)")
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    # Frames are read in random order: readahead would map neighbouring frames too (resident pages, I/O).
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


class Composition(NamedTuple):
    """What the energy-bias fit reads of a frame."""

    numbers: np.ndarray
    energy: float | None
    source: str


class FrameStore:
    """Random access to the frames of a prepared store (``store[i]`` is a :class:`Frame`).

    Opening maps the files and reads only the per-frame sizes (``n_atoms``, ``n_edges``: 16 bytes a frame);
    a frame is read from the page cache when indexed. Pickling keeps only the path: a worker process
    re-opens the maps (``FrameStore.open``) instead of receiving a copy of the data.
    """

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.cutoff = float(meta["cutoff"])
        arrays = {name: _mapped_array(path / f"{name}.bin", a["dtype"], tuple(a["shape"]))
                  for name, a in meta["arrays"].items()}
        self._arrays = arrays
        self.n_atoms = np.diff(arrays["atom_start"]).astype(np.int64)  # (F,)
        self.n_edges = np.array(arrays["n_edges"], dtype=np.int64)  # (F,)

    @classmethod
    def open(cls, path) -> FrameStore:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a frame store (no meta.json); make one with "
                                    "`python -m dpa4_jax.data.prepare SRC OUT --cutoff R`")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != STORE_VERSION:
            raise ValueError(f"{meta_file}: store version {meta.get('version')}, this code reads version "
                             f"{STORE_VERSION}; prepare the store again")
        return cls(path, meta)

    def __reduce__(self):
        return FrameStore.open, (str(self.path),)

    def __len__(self) -> int:
        return len(self.n_atoms)

    def _index(self, i) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: frame {i} out of range (the store holds {n} frames)")
        return i % n

    def name(self, i) -> str:
        """Frame ``i``'s source (``"file:frame"``), as the reader named it."""
        i = self._index(i)
        a = self._arrays
        return bytes(a["name_bytes"][a["name_start"][i]:a["name_start"][i + 1]]).decode()

    def __getitem__(self, i) -> Frame:
        i = self._index(i)
        a = self._arrays
        atoms = slice(int(a["atom_start"][i]), int(a["atom_start"][i + 1]))
        return Frame(
            numbers=a["numbers"][atoms], positions=a["positions"][atoms], cell=a["cell"][i], pbc=a["pbc"][i],
            energy=float(a["energy"][i]) if a["has_energy"][i] else None,
            forces=a["forces"][atoms] if a["has_forces"][i] else None,
            virial=a["virial"][i] if a["has_virial"][i] else None,
            source=self.name(i), **self._charge_spin(i))

    def _charge_spin(self, i: int) -> dict:
        """Frame ``i``'s ``charge`` and ``spin`` (None where not given; stores prepared before they were
        recorded have neither)."""
        if "charge_spin" not in self._arrays:
            return {}
        return {k: None if np.isnan(v) else v for k, v in zip(("charge", "spin"), self._arrays["charge_spin"][i])}

    def composition(self, i) -> Composition:
        """Frame ``i``'s atomic numbers and energy, without reading its positions or labels (the energy-bias
        fit reads only these)."""
        i = self._index(i)
        a = self._arrays
        energy = float(a["energy"][i]) if a["has_energy"][i] else None
        return Composition(a["numbers"][a["atom_start"][i]:a["atom_start"][i + 1]], energy, self.name(i))

    def charge_spin(self) -> np.ndarray:
        """``(F, 2)`` every frame's total charge and spin multiplicity, NaN where not given."""
        return np.asarray(self._arrays.get("charge_spin", np.full((len(self), 2), np.nan)))

    def elements(self) -> np.ndarray:
        """The atomic numbers present in the store (one pass over the numbers array)."""
        return np.flatnonzero(np.bincount(self._arrays["numbers"], minlength=119))

    def __repr__(self) -> str:
        return (f"FrameStore({str(self.path)!r}, {len(self)} frames, {int(self.n_atoms.sum())} atoms, "
                f"cutoff={self.cutoff})")


class InMemoryFrames:
    """Frames held in a list, with the read interface of :class:`FrameStore` (for small raw files).

    ``n_edges`` is counted at construction in ``workers`` processes (default: every usable core).
    """

    def __init__(self, frames: Iterable[Frame], cutoff: float, workers: int | None = None):
        self.frames = list(frames)
        self.cutoff = float(cutoff)
        self.n_atoms = np.array([f.natoms for f in self.frames], dtype=np.int64)
        count = functools.partial(count_edges, cutoff=self.cutoff)
        counts = ordered_map(count, map(_structures, _chunks(self.frames, 256)),
                             default_workers() if workers is None else workers)
        self.n_edges = np.concatenate([np.zeros(0, np.int64), *counts])

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i) -> Frame:
        return self.frames[int(i)]

    def name(self, i) -> str:
        return self.frames[int(i)].source

    def composition(self, i) -> Frame:
        return self.frames[int(i)]  # a Frame has the fields of a Composition

    def charge_spin(self) -> np.ndarray:
        """``(F, 2)`` every frame's total charge and spin multiplicity, NaN where not given."""
        return np.array([[np.nan if v is None else v for v in (f.charge, f.spin)] for f in self.frames],
                        dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------- writing a store

class _Writer:
    """Appends frames (and later their edge counts) to the raw files of a store directory."""

    def __init__(self, path: Path):
        self.path = path
        self.files = {name: open(path / f"{name}.bin", "wb")
                      for name in [*_PER_ATOM, *_PER_FRAME, "atom_start", "n_edges", "name_bytes", "name_start"]}
        self.n_frames = self.n_atoms = self.n_name_bytes = self.n_edges = 0
        self._write("atom_start", np.zeros(1, np.int64))
        self._write("name_start", np.zeros(1, np.int64))

    def _write(self, name: str, array):
        self.files[name].write(np.ascontiguousarray(array).tobytes())

    def append(self, frames: Sequence[Frame]):
        n_atoms = np.array([f.natoms for f in frames], dtype=np.int64)
        names = [f.source.encode() for f in frames]
        self._write("numbers", np.concatenate([f.numbers for f in frames]).astype(np.uint8))
        self._write("positions", np.concatenate([f.positions for f in frames]))
        self._write("forces", np.concatenate([np.zeros((f.natoms, 3)) if f.forces is None else f.forces
                                              for f in frames]))
        self._write("cell", np.stack([f.cell for f in frames]))
        self._write("pbc", np.stack([f.pbc for f in frames]))
        self._write("energy", np.array([np.nan if f.energy is None else f.energy for f in frames]))
        self._write("virial", np.stack([np.zeros((3, 3)) if f.virial is None else f.virial for f in frames]))
        self._write("charge_spin", np.array([[np.nan if v is None else v for v in (f.charge, f.spin)] for f in frames],
                                            dtype=np.float64))
        for label in ("energy", "forces", "virial"):
            self._write(f"has_{label}", np.array([getattr(f, label) is not None for f in frames]))
        self._write("atom_start", self.n_atoms + np.cumsum(n_atoms))
        self._write("name_bytes", np.frombuffer(b"".join(names), dtype=np.uint8))
        self._write("name_start", self.n_name_bytes + np.cumsum([len(s) for s in names], dtype=np.int64))
        self.n_frames += len(frames)
        self.n_atoms += int(n_atoms.sum())
        self.n_name_bytes += sum(len(s) for s in names)

    def append_edges(self, counts: np.ndarray):
        self._write("n_edges", counts.astype(np.int64))
        self.n_edges += int(counts.sum())

    def finish(self, meta: dict) -> dict:
        """Close the files and write ``meta.json`` (last: a store without it is not a store)."""
        self.close()
        frames, atoms = self.n_frames, self.n_atoms
        shapes = {**{k: (atoms, *s) for k, (_, s) in _PER_ATOM.items()},
                  **{k: (frames, *s) for k, (_, s) in _PER_FRAME.items()},
                  "atom_start": (frames + 1,), "n_edges": (frames,), "name_bytes": (self.n_name_bytes,),
                  "name_start": (frames + 1,)}
        dtypes = {**{k: d for k, (d, _) in {**_PER_ATOM, **_PER_FRAME}.items()}, "atom_start": "<i8",
                  "n_edges": "<i8", "name_bytes": "u1", "name_start": "<i8"}
        meta = dict(meta, version=STORE_VERSION, n_frames=frames, n_atoms=atoms,
                    arrays={k: {"dtype": dtypes[k], "shape": list(shapes[k])} for k in shapes})
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta

    def close(self):
        for f in self.files.values():
            f.close()


def _read_sources(sources: Sequence, format: str | None, reader_keys: dict) -> Iterator[Frame]:
    for src in sources:
        yield from read_frames(src, format=format, **reader_keys)


def prepare(sources, out, cutoff: float, *, format: str | None = None, workers: int | None = None,
            progress: bool = True, max_frames: int | None = None, chunk_frames: int = 512,
            **reader_keys) -> FrameStore:
    """Convert ``sources`` (one path or several, any format :func:`read_frames` reads) into a store at ``out``.

    Frames are streamed: read ``chunk_frames`` at a time, appended to the files, and their edges at
    ``cutoff`` counted in ``workers`` processes (default: every usable core; 0: in this process) while the
    next chunk is read. The store is written into a temporary sibling directory and renamed to ``out`` when
    complete, so an interrupted conversion leaves no store behind. ``reader_keys`` go to the readers
    (``energy_key=...``). ``max_frames`` stops after that many frames (a subset for a trial run).
    """
    from tqdm.auto import tqdm

    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or choose another output directory")
    workers = default_workers() if workers is None else workers
    frames = itertools.islice(_read_sources(sources, format, reader_keys), max_frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    writer = _Writer(tmp)
    try:
        def written(chunk):  # the frames go to disk as their structures go to the edge counters
            writer.append(chunk)
            return _structures(chunk)

        with tqdm(desc=f"preparing {out.name}", unit="frame", disable=not progress, dynamic_ncols=True) as bar:
            count = functools.partial(count_edges, cutoff=float(cutoff))
            for counts in ordered_map(count, map(written, _chunks(frames, chunk_frames)), workers):
                writer.append_edges(counts)
                bar.update(len(counts))
        if writer.n_frames == 0:
            raise ValueError(f"{', '.join(map(str, sources))}: no frames read")
        writer.finish(dict(cutoff=float(cutoff), sources=[str(Path(s).resolve()) for s in sources], format=format,
                           reader_keys=reader_keys, n_edges=writer.n_edges,
                           created=datetime.datetime.now().isoformat(timespec="seconds")))
        os.rename(tmp, out)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FrameStore.open(out)
