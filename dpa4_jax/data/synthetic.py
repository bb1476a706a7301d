"""Synthetic data in the MPtrj JSON layout, for tests and benchmarks of the data pipeline without a download.

Materials are random crystals (nine ``ase.build.bulk`` prototypes, 1-3 elements of the MPtrj type map,
8-100 atoms, nearest neighbours 2.0-3.2 Å); each has 1-20 frames (MPtrj averages 11), strained by up to
±3 % and rattled by 0.02-0.1 Å. Labels are random numbers of realistic size (energies about -5 eV/atom,
forces of 0.5 eV/Å, stresses of 20 kBar), not physics: sizes, neighbour counts and the file layout are what
these sets are for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dpa4_jax.elements import MPTRJ_ELEMENTS

__all__ = ["write_synthetic_mptrj"]

# ase.build.bulk prototype -> (name with the prototype's number of species, nearest-neighbour distance / a)
_PROTOTYPES = {
    "sc": ("Cu", 1.0), "fcc": ("Cu", 1 / math.sqrt(2)), "bcc": ("Fe", math.sqrt(3) / 2), "hcp": ("Mg", 1.0),
    "diamond": ("Si", math.sqrt(3) / 4), "rocksalt": ("NaCl", 0.5), "zincblende": ("ZnS", math.sqrt(3) / 4),
    "cesiumchloride": ("CsCl", math.sqrt(3) / 2), "fluorite": ("CaF2", math.sqrt(3) / 4),
}
_SIZE = (8, 100)


def _crystal(rng: np.random.Generator):
    """A random ``ase.Atoms`` crystal of 8-100 atoms."""
    from ase.build import bulk

    kind = list(_PROTOTYPES)[rng.integers(len(_PROTOTYPES))]
    name, nn_over_a = _PROTOTYPES[kind]
    a = rng.uniform(2.0, 3.2) / nn_over_a
    atoms = bulk(name, kind, a=a, c=1.633 * a) if kind == "hcp" else bulk(name, kind, a=a)
    while True:
        repeat = rng.integers(1, 6, size=3)
        if _SIZE[0] <= len(atoms) * repeat.prod() <= _SIZE[1]:
            break
    atoms = atoms.repeat(tuple(int(r) for r in repeat))
    elements = rng.choice(len(MPTRJ_ELEMENTS), size=rng.integers(1, 4), replace=False)
    atoms.set_chemical_symbols([MPTRJ_ELEMENTS[e] for e in rng.choice(elements, size=len(atoms))])
    return atoms


def _record(atoms, rng: np.random.Generator, energy_per_atom: float) -> dict:
    """One perturbed frame of ``atoms`` as an MPtrj record (pymatgen Structure dict and labels)."""
    n = len(atoms)
    strain = rng.uniform(-0.03, 0.03, size=(3, 3))
    cell = atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T))
    frac = atoms.get_scaled_positions() + rng.normal(0, rng.uniform(0.02, 0.1), size=(n, 3)) @ np.linalg.inv(cell)
    xyz = frac @ cell
    forces = rng.normal(0, 0.5, size=(n, 3))
    stress = rng.normal(0, 20, size=(3, 3))
    magmom = rng.normal(0, 1, size=n)
    symbols = atoms.get_chemical_symbols()
    sites = [{"species": [{"element": s, "occu": 1}], "abc": f.tolist(), "xyz": x.tolist(), "label": s,
              "properties": {"magmom": float(m)}} for s, f, x, m in zip(symbols, frac, xyz, magmom)]
    energy = (energy_per_atom + rng.normal(0, 0.05)) * n
    correction = rng.normal(0, 0.1) * n
    return {
        "structure": {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
                      "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True]}, "properties": {},
                      "sites": sites},
        "uncorrected_total_energy": energy, "corrected_total_energy": energy + correction,
        "energy_per_atom": (energy + correction) / n, "ef_per_atom": rng.normal(0, 0.5),
        "force": (forces - forces.mean(axis=0)).tolist(), "stress": (0.5 * (stress + stress.T)).tolist(),
        "magmom": magmom.tolist(), "bandgap": rng.uniform(0, 3),
    }


def write_synthetic_mptrj(path, n_frames: int, seed: int = 0, progress: bool = False) -> Path:
    """Write ``n_frames`` synthetic frames in the MPtrj layout to ``path``, one material at a time.

    ``{mp_id: {frame_id: record}}`` with ``mp_id = "mp-<k>"`` and ``frame_id = "mp-<k>-0-<j>"``.
    Deterministic for ``seed``; memory is one material's frames.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w") as fh, tqdm(total=n_frames, desc=f"writing {path.name}", unit="frame",
                                     disable=not progress) as bar:
        fh.write("{")
        for k in range(n_frames):
            if written >= n_frames:
                break
            atoms = _crystal(rng)
            count = min(int(rng.integers(1, 21)), n_frames - written)
            e0 = rng.normal(-5.0, 1.5)
            frames = {f"mp-{k}-0-{j}": _record(atoms, rng, e0) for j in range(count)}
            fh.write(("" if k == 0 else ", ") + f'"mp-{k}": ' + json.dumps(frames))
            written += count
            bar.update(count)
        fh.write("}")
    return path


def main(argv=None) -> None:
    """``python -m dpa4_jax.data.synthetic OUT.json --frames N [--seed S]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dpa4_jax.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out", help="JSON file to write (MPtrj layout)")
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_synthetic_mptrj(args.out, args.frames, seed=args.seed, progress=True)


if __name__ == "__main__":
    main()
