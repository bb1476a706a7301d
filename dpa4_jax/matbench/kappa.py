"""The Matbench Discovery κ protocol (κ_SRME, arXiv 2408.00755) with a DPA4 model.

    python -m dpa4_jax.matbench kappa --model runs/air --structures 2024-11-09-phononDB-PBE-103-structures.extxyz \\
        --reference 2024-11-09-kappas-phononDB-PBE-noNAC.json.gz --output results/kappa

reads the PhononDB structures the user downloaded (extxyz; each frame's ``info`` holds ``material_id``,
``fc2_supercell``, ``fc3_supercell`` and ``q_point_mesh``) and, for each, follows the protocol:

1. relax with the symmetry kept (``FixSymmetry``, ``FrechetCellFilter`` on the diagonal strains, ``FIRE`` to
   ``fmax`` 1e-4 eV/Å, at most 300 steps); the space group (spglib, symprec 1e-5) before and after;
2. FC2 from phono3py's displacements in the ``fc2_supercell`` (0.03 Å), frequencies on the ``q_point_mesh``;
   imaginary modes flagged as the protocol does (``phonons.imaginary_modes``);
3. unless modes are imaginary or the symmetry broke: FC3 in the ``fc3_supercell`` and κ at 300 K from
   phono3py's Wigner RTA (isotope scattering, boundary mean free path 1e6 µm): ``kappa_tot_rta``
   (κ_P + κ_C), ``kappa_p_rta``, ``kappa_c`` and the per-mode ``mode_kappa_tot_rta``.

The displaced supercells of a structure are evaluated many per model call (``batched.forces_of_many``).
It writes ``kappa.json.gz`` (one row per structure, the protocol's column names, readable by
``pandas.read_json``), and with ``--reference`` the scores per structure (SRD, SRE, SRME; a structure with
imaginary modes, broken symmetry or a failure scores SRD -2 and SRME 2, as in the protocol) and their mean,
κ_SRME. matbench-discovery on PyPI (1.3.1, the newest there) has no phonon module, so the metric is written here
from the paper's definition (Eq. 5-7) and the benchmark's conventions (directional average of xx, yy, zz).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpa4_jax import phonons
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.checkpoint import atomic_dir

PROTOCOL = dict(displacement=phonons.DISTANCE, fmax=phonons.FMAX, max_steps=phonons.MAX_STEPS,
                symprec=phonons.SYMPREC, temperatures=(300.0,))
INFO_KEYS = ("material_id", "fc2_supercell", "fc3_supercell", "q_point_mesh")


def read_structures(path) -> list:
    """The frames of a PhononDB extxyz file, each checked for the protocol's ``info`` keys."""
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except FileNotFoundError:
        raise ValueError(f"structures file {path}: no such file") from None
    except Exception as e:  # ASE's readers raise many kinds of errors on a malformed file
        raise ValueError(f"structures file {path} could not be read: {type(e).__name__}: {e}") from None
    for i, atoms in enumerate(frames):
        missing = [k for k in INFO_KEYS if k not in atoms.info]
        if missing:
            raise ValueError(f"structures file {path}, frame {i}: info lacks {', '.join(missing)} "
                             f"(the protocol's keys: {', '.join(INFO_KEYS)})")
    return frames


def space_group(atoms, symprec: float) -> int:
    import spglib

    return spglib.get_symmetry_dataset((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers),
                                       symprec=symprec).number


def mode_kappa_total(mode_kappa_matrix: np.ndarray, heat_capacity: np.ndarray) -> np.ndarray:
    """Per-mode κ ``(T, q, band, 6)`` from phono3py's Wigner band-pair matrix ``(T, q, band, band, 6)`` (diagonal:
    κ_P, off-diagonal: κ_C) and the mode heat capacities ``(T, q, band)``: each coherence pair (n, n') is split
    between its two modes in proportion to their heat capacities, ``sum_n' M[n, n'] 2 C_n / (C_n + C_n')``, so the
    modes add up to κ_P + κ_C (pairs of modes without heat capacity give 0)."""
    c_n, c_m = heat_capacity[..., :, None], heat_capacity[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.nan_to_num(2 * c_n / (c_n + c_m), nan=0.0, posinf=0.0)
    return np.einsum("tqnmk,tqnm->tqnk", mode_kappa_matrix, share)


def directional_average(kappa) -> np.ndarray:
    """Mean of the xx, yy, zz components (last axis, Voigt order)."""
    return np.asarray(kappa, dtype=float)[..., :3].mean(axis=-1)


def kappa_of(calc, atoms, displacement: float, fmax: float, max_steps: int, symprec: float, temperatures,
             batch_size: int | None = None) -> dict:
    """The protocol for one PhononDB structure: a row of the results (failures recorded under ``errors``)."""
    row = {"material_id": atoms.info["material_id"], "formula": atoms.get_chemical_formula(), "errors": []}
    try:
        row["initial_spg_num"] = space_group(atoms, symprec)
        relaxed, steps = phonons.relax(atoms, calc, fmax, max_steps, symprec) if max_steps > 0 else (atoms, 0)
        row.update(relax_steps=steps, reached_max_steps=bool(max_steps > 0 and steps >= max_steps),
                   final_spg_num=space_group(relaxed, symprec))
        row["broken_symmetry"] = row["final_spg_num"] != row["initial_spg_num"]
        ph3 = phonons.init_phono3py(relaxed, atoms.info["fc3_supercell"], atoms.info["fc2_supercell"],
                                    tuple(int(m) for m in np.ravel(atoms.info["q_point_mesh"])), displacement,
                                    symprec)
        phonons.produce_fc2(calc, ph3, "displacements", batch_size)
        modes = phonons.imaginary_modes(ph3)
        row["has_imag_ph_modes"] = bool(modes)
        if modes:
            row["errors"].append(phonons.describe_modes(modes))
        if modes or row["broken_symmetry"]:
            return row
        phonons.produce_fc3(calc, ph3, batch_size)
        kappa = phonons.conductivity(ph3, temperatures)
        row.update(kappa_tot_rta=kappa.kappa[0], kappa_p_rta=kappa.kappa_intra[0], kappa_c=kappa.kappa_inter[0],
                   mode_kappa_tot_rta=mode_kappa_total(kappa.mode_kappa_matrix[0], kappa.mode_heat_capacities),
                   mode_weights=kappa.grid_weights, q_points=kappa.qpoints, ph_freqs=kappa.frequencies)
    except Exception as e:  # one structure's failure is recorded and scored as the protocol scores it
        row["errors"].append(f"{type(e).__name__}: {e}")
        row["error_traceback"] = traceback.format_exc()
    return row


def _modes_average(row) -> np.ndarray:
    if "mode_kappa_tot_avg" in row and row["mode_kappa_tot_avg"] is not None:
        return np.asarray(row["mode_kappa_tot_avg"], dtype=float)
    return directional_average(row["mode_kappa_tot_rta"])


def _kappa_average(row) -> np.ndarray:
    if "kappa_tot_avg" in row and row["kappa_tot_avg"] is not None:
        return np.atleast_1d(np.asarray(row["kappa_tot_avg"], dtype=float))
    return directional_average(row["kappa_tot_rta"])


def srme(pred: dict, true: dict) -> tuple[float, float]:
    """``(SRD, SRME)`` of one structure at the first temperature:
    ``SRD = 2 (κ_pred - κ_true) / (κ_pred + κ_true)``, ``SRME = 2 sum_modes |κ_pred,m - κ_true,m| / W /
    (κ_pred + κ_true)`` with κ the directional average and W the sum of the q-point weights; (-2, 2) for a
    structure flagged or without κ."""
    kappa_true = _kappa_average(true)[0]
    if pred.get("has_imag_ph_modes") or pred.get("broken_symmetry") or pred.get("kappa_tot_rta") is None:
        return -2.0, 2.0
    kappa_pred = _kappa_average(pred)[0]
    if not np.isfinite(kappa_pred):
        return -2.0, 2.0
    difference = np.abs(_modes_average(pred)[0] - _modes_average(true)[0]).sum() / np.sum(pred["mode_weights"])
    return 2 * (kappa_pred - kappa_true) / (kappa_pred + kappa_true), 2 * difference / (kappa_pred + kappa_true)


def score(rows: list[dict], reference) -> tuple[list[dict], float]:
    """Per structure SRD, SRE and SRME against ``reference`` (a DataFrame indexed by material id), and κ_SRME."""
    for row in rows:
        if row["material_id"] not in reference.index:
            raise ValueError(f"reference has no row for {row['material_id']}")
        srd, value = srme(row, reference.loc[row["material_id"]].to_dict())
        row.update(srd=srd, sre=abs(srd), srme=value)
    return rows, float(np.mean([row["srme"] for row in rows]))


def read_reference(path):
    """The DFT κ file (``pandas.read_json``), indexed by ``material_id`` (or ``mp_id``)."""
    import pandas as pd

    df = pd.read_json(path)
    key = "material_id" if "material_id" in df else "mp_id" if "mp_id" in df else None
    if key is None:
        raise ValueError(f"reference {path}: no material_id or mp_id column (columns: {', '.join(df.columns)})")
    return df.set_index(key)


def write_rows(rows: list[dict], output: Path):
    """``kappa.json.gz`` in ``output``, created whole (written beside it, then renamed)."""
    import pandas as pd

    table = pd.DataFrame([{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows])
    atomic_dir(output, lambda folder: table.to_json(folder / "kappa.json.gz", default_handler=str,
                                                    double_precision=15))


def main(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m dpa4_jax.matbench {command}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dpa4-jax run or model directory, or a DeePMD-kit DPA4 model file")
    p.add_argument("--structures", required=True, help="the PhononDB structures (extxyz with the protocol's info)")
    p.add_argument("--output", required=True, help="folder to create: kappa.json.gz")
    p.add_argument("--reference", help="the DFT κ file (JSON, per material_id) to score against: κ_SRME")
    p.add_argument("--displacement", type=float, default=PROTOCOL["displacement"], help="Å")
    p.add_argument("--fmax", type=float, default=PROTOCOL["fmax"], help="relaxation, eV/Å")
    p.add_argument("--max-steps", type=int, default=PROTOCOL["max_steps"], help="relaxation steps (0: none)")
    p.add_argument("--symprec", type=float, default=PROTOCOL["symprec"])
    p.add_argument("--temperature", type=float, nargs="+", default=list(PROTOCOL["temperatures"]), help="K")
    p.add_argument("--batch-size", type=int, help="supercells per model call")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = p.parse_args(argv)
    output = Path(args.output)
    start = time.perf_counter()
    try:
        if output.exists():
            raise FileExistsError(f"output folder {output} exists: remove it or choose another")
        frames = read_structures(args.structures)
        reference = read_reference(args.reference) if args.reference else None
        calc = DPA4Calculator.load(args.model, dtype=args.dtype)
        rows = [kappa_of(calc, atoms, args.displacement, args.fmax, args.max_steps, args.symprec, args.temperature,
                         args.batch_size) for atoms in tqdm(frames, desc="structures", unit="structure")]
        mean = None
        if reference is not None:
            rows, mean = score(rows, reference)
        write_rows(rows, output)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        flags = "; ".join(row["errors"]) or "ok"
        kappa = directional_average(row["kappa_tot_rta"])[0] if "kappa_tot_rta" in row else float("nan")
        scored = f"  SRME {row['srme']:.3f}" if "srme" in row else ""
        print(f"{row['material_id']:>12s} {row['formula']:>10s}  κ {kappa:9.4g} W/m-K{scored}  {flags}")
    if mean is not None:
        print(f"κ_SRME {mean:.4f} over {len(rows)} structures")
    print(f"{len(rows)} structures, {time.perf_counter() - start:.1f} s; written to {output / 'kappa.json.gz'}")
    return 0
