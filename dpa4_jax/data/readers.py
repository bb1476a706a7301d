"""Readers for labelled atomic data: extxyz (via ASE), DeePMD npy systems, MPtrj JSON.

Every reader returns an iterator of :class:`~dpa4_jax.data.frame.Frame`.  Paths
are checked when the reader is called (a missing path fails at once, not at the
first ``next``); frames are produced lazily.  Errors name the file and frame.

Each format's generator yields a frame, or the :class:`FrameError` of a frame that
could not be built (so that one bad frame does not end the file), and every public
reader passes them through :func:`~dpa4_jax.data.validate.screen_frames`, the one
place of the bad-frame policy (``min_pair_dist``, ``on_bad_frame``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .frame import Frame, FrameError, UnreadableError, stress_to_virial
from .validate import screen_frames

__all__ = [
    "read_extxyz",
    "read_deepmd",
    "read_mptrj",
    "read_frames",
    "split_frames",
    "find_deepmd_systems",
]


def _check_exists(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    return p


def _attempt(build, src: str) -> Frame | FrameError:
    """``build()``'s frame, or the error that makes this one frame bad (named by ``src``)."""
    try:
        return build()
    except FrameError as e:
        return e
    except (TypeError, ValueError, KeyError) as e:  # a malformed record
        return FrameError(f"{src}: {type(e).__name__}: {e}")


def _symbol_to_z(symbol: str, where: str) -> int:
    from ase.data import atomic_numbers

    z = atomic_numbers.get(str(symbol).strip())
    if z is None or z == 0:
        raise FrameError(f"{where}: unknown element symbol {symbol!r}")
    return int(z)


# ---------------------------------------------------------------------------
# extxyz
# ---------------------------------------------------------------------------


def _file_indices(index) -> Iterator[str] | None:
    """Frame indices in the file for a simple slice/int index, else None."""
    from ase.utils import string2index

    idx = string2index(index) if isinstance(index, str) else index
    if isinstance(idx, int) and idx >= 0:
        return iter([str(idx)])
    if isinstance(idx, slice):
        start = 0 if idx.start is None else idx.start
        step = 1 if idx.step is None else idx.step
        if start >= 0 and step > 0:
            import itertools

            return (str(i) for i in itertools.count(start, step))
    return None


def _lookup(atoms, key: str, per_atom: bool):
    """Label ``key`` from atoms.info / atoms.arrays, else from the calculator.

    ASE's extxyz reader moves keys it knows (``energy``, ``forces``,
    ``stress``, ``free_energy``, ...) into a SinglePointCalculator.
    """
    if key is None:
        return None
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def read_extxyz(
    path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    index=":",
    virial_key: str | None = None,
    *,
    min_pair_dist: float = 0.1,
    on_bad_frame: str = "error",
) -> Iterator[Frame]:
    """Read an extended-XYZ file through ``ase.io.iread``.

    Labels come from ``atoms.info`` (energy, stress, virial) and
    ``atoms.arrays`` (forces) under the given keys, e.g. ``REF_energy``,
    ``REF_forces``, ``REF_stress``; keys that ASE stores in a
    SinglePointCalculator (the plain ``energy``/``forces``/``stress``) are read
    from there.  ``stress`` is in ASE sign (tensile positive), eV/Å^3, as 6
    Voigt components (xx yy zz yz xz xy) or 9 components (3x3); it becomes
    ``virial = -V * stress``.  When no stress is found and ``virial_key`` is
    given, a 9-component virial (eV) is read directly.  Missing labels are None.
    The info key ``config_type`` (a subset name) becomes ``Frame.config_type``.
    A parse error (a truncated or corrupted file) ends the file there.
    """
    p = _check_exists(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, expected an extxyz file")
    items = _iter_extxyz(p, (energy_key, forces_key, stress_key, virial_key), index)
    return screen_frames(items, str(p), min_pair_dist, on_bad_frame)


def _iter_extxyz(p, keys, index):
    import ase.io

    indices = _file_indices(index)
    k = 0
    try:
        for atoms in ase.io.iread(str(p), index=index, format="extxyz", do_not_split_by_at_sign=True):
            src = f"{p}:{next(indices) if indices is not None else f'{index}#{k}'}"
            k += 1
            yield _attempt(lambda: _extxyz_frame(atoms, *keys, src), src)
    except Exception as e:  # ASE parse errors: the rest of the file is unreadable
        yield UnreadableError(f"{p}: cannot parse extxyz near frame {k}: {type(e).__name__}: {e}")


def _extxyz_frame(atoms, energy_key, forces_key, stress_key, virial_key, src) -> Frame:
    energy = _lookup(atoms, energy_key, per_atom=False)
    forces = _lookup(atoms, forces_key, per_atom=True)
    stress = _lookup(atoms, stress_key, per_atom=False)
    virial = None
    if stress is None and virial_key is not None:
        virial = _lookup(atoms, virial_key, per_atom=False)
    if isinstance(energy, (str, bool)):
        raise FrameError(f"{src}: {energy_key}={energy!r} is not a number")
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.size not in (6, 9):
            raise FrameError(f"{src}: {stress_key} has {stress.size} components, expected 6 or 9")
        if not atoms.pbc.any():
            raise FrameError(f"{src}: {stress_key} given for a non-periodic frame (pbc all False)")
    return Frame.from_atoms(atoms, energy=energy, forces=forces, stress=stress, virial=virial, source=src,
                            config_type=atoms.info.get("config_type", ""))


# ---------------------------------------------------------------------------
# DeePMD npy
# ---------------------------------------------------------------------------


def find_deepmd_systems(path) -> list[Path]:
    """DeePMD system folders (those holding ``type.raw``) at or under ``path``, sorted."""
    p = _check_exists(path)
    if (p / "type.raw").is_file():
        return [p]
    systems = []
    for root, dirs, files in os.walk(p, followlinks=True):
        dirs.sort()
        if "type.raw" in files:
            systems.append(Path(root))
            dirs[:] = []  # a system's set.* folders hold no further systems
    return sorted(systems)


def read_deepmd(path, type_map: Sequence[str] | None = None, *, min_pair_dist: float = 0.1,
                on_bad_frame: str = "error") -> Iterator[Frame]:
    """Read a DeePMD npy system folder, or every system folder under ``path``.

    A system folder holds ``type.raw`` (one type index per atom),
    ``type_map.raw`` (element symbol per type index) and ``set.*/`` folders
    with ``coord.npy`` (nframes, 3N), ``box.npy`` (nframes, 9; rows are lattice
    vectors), and optional labels ``energy.npy`` (nframes,), ``force.npy``
    (nframes, 3N), ``virial.npy`` (nframes, 9, eV).  An (empty) ``nopbc`` file
    means no cell.  Mixed-type systems (``set.*/real_atom_types.npy``, type -1
    for padding atoms) are supported.  ``type_map`` is used when a system has
    no ``type_map.raw``.  A set whose files cannot be loaded or disagree in
    shape is unreadable as a whole.
    """
    p = _check_exists(path)
    if not p.is_dir():
        raise NotADirectoryError(f"{p}: expected a DeePMD system folder (with type.raw) or a tree of them")
    systems = find_deepmd_systems(p)
    if not systems:
        raise FileNotFoundError(f"{p}: no DeePMD system (folder with type.raw) found")
    return screen_frames(_iter_deepmd(systems, type_map), str(p), min_pair_dist, on_bad_frame)


def _iter_deepmd(systems, type_map):
    for s in systems:
        yield from _iter_deepmd_system(s, type_map)


def _load_npy(f: Path) -> np.ndarray:
    try:
        return np.load(f, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{f}: cannot load: {e}") from e


def _deepmd_header(sys_dir: Path, type_map):
    """(type per atom from type.raw, Z per type index, nopbc, set folders) of a system."""
    types = np.loadtxt(sys_dir / "type.raw", dtype=np.int64, ndmin=1)
    if types.ndim != 1 or types.size == 0:
        raise ValueError(f"{sys_dir / 'type.raw'}: expected one integer type per atom")
    tm_file = sys_dir / "type_map.raw"
    if tm_file.is_file():
        tmap = tm_file.read_text().split()
    elif type_map is not None:
        tmap = list(type_map)
    else:
        raise FileNotFoundError(f"{tm_file}: missing (element symbols are needed; pass type_map=...)")
    z_of_type = np.array([_symbol_to_z(s, str(tm_file)) for s in tmap], dtype=np.int64)
    sets = sorted(d for d in sys_dir.glob("set.*") if d.is_dir())
    if not sets:
        raise FileNotFoundError(f"{sys_dir}: no set.* folders")
    return types, z_of_type, (sys_dir / "nopbc").exists(), sets


def _iter_deepmd_system(sys_dir: Path, type_map):
    types, z_of_type, nopbc, sets = _deepmd_header(sys_dir, type_map)
    for sd in sets:
        try:
            arrays = _load_deepmd_set(sd, types, len(z_of_type), nopbc)
        except (OSError, ValueError) as e:  # a corrupt, missing or mis-shaped file: the whole set
            yield UnreadableError(str(e))
            continue
        for i in range(len(arrays["coord"])):
            yield _attempt(lambda: _deepmd_frame(sd, i, arrays, z_of_type, nopbc), f"{sd}:{i}")


def _load_deepmd_set(sd: Path, types: np.ndarray, ntypes: int, nopbc: bool) -> dict:
    """The arrays of one ``set.*`` folder, checked for shape: coord (nf, nat, 3), atom_types (nf, nat) and
    the labels (None when absent)."""
    coord_f = sd / "coord.npy"
    if not coord_f.is_file():
        raise FileNotFoundError(f"{coord_f}: missing")
    coord = _load_npy(coord_f).astype(np.float64)
    nf = coord.shape[0]
    coord = coord.reshape(nf, -1)
    real_types_f = sd / "real_atom_types.npy"
    if real_types_f.is_file():
        atom_types = _load_npy(real_types_f).astype(np.int64).reshape(nf, -1)
        if atom_types.shape[1] * 3 != coord.shape[1]:
            raise ValueError(f"{real_types_f}: {atom_types.shape[1]} atoms per frame, but {coord_f} has "
                             f"{coord.shape[1]} values")
    else:
        if coord.shape[1] != 3 * types.size:
            raise ValueError(f"{coord_f}: {coord.shape[1]} values per frame, expected 3 x {types.size} atoms "
                             "(from type.raw)")
        if types.max() >= ntypes or types.min() < 0:
            raise ValueError(f"{sd.parent / 'type.raw'}: type index {int(types.max())} outside type_map of "
                             f"{ntypes} elements")
        atom_types = np.broadcast_to(types, (nf, types.size))
    nat = atom_types.shape[1]

    def label(name, per_frame):
        f = sd / name
        if not f.is_file():
            return None
        a = _load_npy(f).astype(np.float64)
        if a.shape[0] != nf:
            raise ValueError(f"{f}: {a.shape[0]} frames, but {coord_f} has {nf}")
        if a.reshape(nf, -1).shape[1] != per_frame:
            raise ValueError(f"{f}: {a.reshape(nf, -1).shape[1]} values per frame, expected {per_frame}")
        return a.reshape(nf, per_frame)

    arrays = dict(coord=coord.reshape(nf, nat, 3), atom_types=atom_types, box=None if nopbc else label("box.npy", 9),
                  energy=label("energy.npy", 1), force=label("force.npy", 3 * nat), virial=label("virial.npy", 9),
                  charge_spin=label("charge_spin.npy", 2))
    if arrays["box"] is None and not nopbc:
        raise FileNotFoundError(f"{sd / 'box.npy'}: missing (and no 'nopbc' file in {sd.parent})")
    if arrays["virial"] is not None and nopbc:
        raise ValueError(f"{sd / 'virial.npy'}: virial labels in a non-periodic ('nopbc') system")
    return arrays


def _deepmd_frame(sd: Path, i: int, arrays: dict, z_of_type: np.ndarray, nopbc: bool) -> Frame:
    t = arrays["atom_types"][i]
    real = t >= 0  # mixed-type systems pad with type -1
    if real.any() and t[real].max() >= len(z_of_type):
        raise FrameError(f"{sd / 'real_atom_types.npy'}: frame {i} has type {int(t.max())} outside type_map")
    energy, force, virial, box, charge_spin = (None if arrays[k] is None else arrays[k][i]
                                               for k in ("energy", "force", "virial", "box", "charge_spin"))
    return Frame(
        numbers=z_of_type[t[real]],
        positions=arrays["coord"][i][real],
        cell=np.zeros((3, 3)) if box is None else box,
        pbc=np.full(3, not nopbc),
        energy=None if energy is None else energy[0],
        forces=None if force is None else force.reshape(-1, 3)[real],
        virial=virial,
        source=f"{sd}:{i}",
        charge=None if charge_spin is None else charge_spin[0],  # DeePMD-kit's charge_spin.npy: [charge, 2S+1]
        spin=None if charge_spin is None else charge_spin[1],
    )


# ---------------------------------------------------------------------------
# MPtrj JSON
# ---------------------------------------------------------------------------

_MPTRJ_ENERGY_KEYS = ("uncorrected_total_energy", "corrected_total_energy", "energy_per_atom")


def read_mptrj(path, energy_key: str = "uncorrected_total_energy", *, min_pair_dist: float = 0.1,
               on_bad_frame: str = "error") -> Iterator[Frame]:
    """Stream the MPtrj JSON (``MPtrj_2022.9_full.json`` layout).

    Layout: ``{mp_id: {frame_id: {"structure": <pymatgen Structure dict>,
    "uncorrected_total_energy": eV, "corrected_total_energy": eV,
    "energy_per_atom": eV/atom, "force": (N,3) eV/Å, "stress": 3x3 kBar
    (VASP sign, compressive positive), ...}}}``.

    Parsed with ``ijson`` one material (``mp_id`` entry) at a time, so the
    12 GB file is never loaded at once; pymatgen is not needed.  Stress is
    converted to ASE sign in eV/Å^3 (``-0.1 * kbar * ase.units.GPa``) and then
    to ``virial = -V * stress``.  ``energy_key="energy_per_atom"`` is
    multiplied by the number of atoms.  Frame sources are
    ``"<file>:<mp_id>/<frame_id>"``.  Invalid JSON (a truncated file) ends the
    file there, naming the last frame read.
    """
    if energy_key not in _MPTRJ_ENERGY_KEYS:
        raise ValueError(f"energy_key must be one of {_MPTRJ_ENERGY_KEYS}, got {energy_key!r}")
    p = _check_exists(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, expected an MPtrj JSON file")
    try:
        import ijson
    except ImportError as e:  # pragma: no cover
        raise ImportError("read_mptrj needs the 'ijson' package (pip install ijson)") from e
    return screen_frames(_iter_mptrj(p, energy_key, ijson), str(p), min_pair_dist, on_bad_frame)


def _iter_mptrj(p: Path, energy_key: str, ijson):
    last = "the first frame"
    with open(p, "rb") as fh:
        try:
            # One material at a time (kvitems builds each mp_id's dict in C).
            for mp_id, frames in ijson.kvitems(fh, "", use_float=True):
                if not isinstance(frames, dict):
                    yield FrameError(f"{p}:{mp_id}: expected an object of frames, got {type(frames).__name__}")
                    continue
                for frame_id, rec in frames.items():
                    src = last = f"{p}:{mp_id}/{frame_id}"
                    yield _attempt(lambda: _mptrj_frame(rec, energy_key, src), src)
        except ijson.JSONError as e:
            yield UnreadableError(f"{p}: invalid JSON after {last}: {e}")


def _mptrj_frame(rec, energy_key: str, src: str) -> Frame:
    from ase.units import GPa

    if not isinstance(rec, dict) or "structure" not in rec:
        raise FrameError(f"{src}: frame record has no 'structure'")
    numbers, positions, cell, pbc = _parse_pmg_structure(rec["structure"], src)
    n = numbers.shape[0]
    energy = rec.get(energy_key)
    if energy is not None and energy_key == "energy_per_atom":
        energy = float(energy) * n
    forces = rec.get("force")
    virial = None
    stress_kbar = rec.get("stress")
    if stress_kbar is not None:
        s = np.asarray(stress_kbar, dtype=np.float64)
        if s.size != 9:
            raise FrameError(f"{src}: stress has shape {s.shape}, expected 3x3 (kBar)")
        if not pbc.any():
            raise FrameError(f"{src}: stress given for a non-periodic structure")
        stress = -0.1 * s.reshape(3, 3) * GPa  # kBar, VASP sign -> eV/Å^3, ASE sign
        virial = stress_to_virial(stress, cell)
    return Frame(
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=energy,
        forces=forces,
        virial=virial,
        source=src,
    )


def _parse_pmg_structure(d, src: str):
    """(numbers, cartesian positions, cell, pbc) from a pymatgen Structure dict."""
    try:
        lat = d["lattice"]
        cell = np.asarray(lat["matrix"], dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(lat.get("pbc", (True, True, True)), dtype=bool)
        sites = d["sites"]
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"{src}: malformed structure dict ({type(e).__name__}: {e})") from None
    if not sites:
        raise FrameError(f"{src}: structure has no sites")
    numbers = np.empty(len(sites), dtype=np.int64)
    positions = np.empty((len(sites), 3), dtype=np.float64)
    for i, site in enumerate(sites):
        species = site.get("species") or []
        if len(species) != 1 or float(species[0].get("occu", 1.0)) != 1.0:
            raise FrameError(f"{src}: site {i} is disordered ({species}); only ordered structures are supported")
        numbers[i] = _symbol_to_z(species[0]["element"], f"{src}: site {i}")
        if site.get("xyz") is not None:
            positions[i] = np.asarray(site["xyz"], dtype=np.float64)
        elif site.get("abc") is not None:
            positions[i] = np.asarray(site["abc"], dtype=np.float64) @ cell
        else:
            raise FrameError(f"{src}: site {i} has neither 'xyz' nor 'abc' coordinates")
    return numbers, positions, cell, pbc


# ---------------------------------------------------------------------------
# dispatch and split
# ---------------------------------------------------------------------------

_FORMATS = ("deepmd", "extxyz", "mptrj")


def data_format(path, format: str | None = None) -> str:
    """The format of a data path: ``format`` when given ("xyz" read as "extxyz"), else guessed from the path:
    a directory holding ``type.raw`` or a tree of such systems is "deepmd", ``*.json`` is "mptrj",
    ``*.xyz``/``*.extxyz`` is "extxyz". An unknown format is an error naming the path."""
    p = Path(path)
    if format is not None:
        fmt = "extxyz" if format.lower() == "xyz" else format.lower()
        if fmt not in _FORMATS:
            raise ValueError(f"{p}: unknown format {format!r}; expected one of {_FORMATS}")
        return fmt
    if p.is_dir():
        if (p / "type.raw").is_file() or find_deepmd_systems(p):
            return "deepmd"
        raise ValueError(f"{p}: directory holds no DeePMD system (no type.raw found); cannot guess the format")
    name = p.name.lower()
    if name.endswith(".json"):
        return "mptrj"
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    raise ValueError(
        f"{p}: unknown data format (suffix {p.suffix!r}); expected a DeePMD folder, .xyz/.extxyz or "
        f".json (MPtrj), or pass format= one of {_FORMATS}"
    )


def read_frames(path, format: str | None = None, *, min_pair_dist: float = 0.1, on_bad_frame: str = "error",
                **keys) -> Iterator[Frame]:
    """Read frames from ``path``, guessing the format unless ``format`` is given.

    A directory (holding ``type.raw`` or a tree of such systems) is DeePMD;
    ``*.json`` is MPtrj; ``*.xyz``/``*.extxyz`` is extended XYZ.  ``keys`` are
    passed to the reader (e.g. ``energy_key="REF_energy"``).  Bad frames (see
    :mod:`dpa4_jax.data.validate`: non-finite or mis-shaped data, no atoms, atoms
    closer than ``min_pair_dist`` Å, a truncated or corrupted file) raise
    :class:`FrameError` naming file and frame (``on_bad_frame="error"``) or are
    skipped with one warning giving their count (``"skip"``).
    """
    p = _check_exists(path)
    fmt = data_format(p, format)
    policy = dict(min_pair_dist=min_pair_dist, on_bad_frame=on_bad_frame)
    reader = {"deepmd": read_deepmd, "extxyz": read_extxyz, "mptrj": read_mptrj}[fmt]
    return reader(p, **keys, **policy)


def split_frames(frames: Iterable[Frame], val_fraction: float, seed: int = 0) -> tuple[list[Frame], list[Frame]]:
    """Deterministic random train/validation split.

    ``round(val_fraction * n)`` frames (at least one when ``val_fraction > 0``
    and ``n >= 2``, and never all of them) go to validation.  Both parts keep
    the input order.  The same ``(n, val_fraction, seed)`` gives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    frames = list(frames)
    n = len(frames)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    train = [f for f, v in zip(frames, is_val) if not v]
    val = [f for f, v in zip(frames, is_val) if v]
    return train, val
