"""Errors of a trained model on a data set, per frame and per subset, and the deviation of a committee of models.

    python -m dpa4_jax.evaluate --checkpoint runs/demo --data demo_data/emt.extxyz --output results/demo

prints the MAE and RMSE of energies (meV/atom), forces (meV/A) and stresses (GPa) for each subset of the frames
(their extxyz ``config_type``; "-" for frames without one) and for all of them, and with ``--output PREFIX``
writes ``PREFIX.errors.csv`` (one row per frame, like DeePMD-kit's ``dp test``) and ``PREFIX.subsets.csv``.

    python -m dpa4_jax.evaluate --committee runs/a runs/b runs/c --data candidates.extxyz --output results/md

also prints and writes (``PREFIX.model_devi.csv``) the model deviation of each frame, DP-GEN's criterion: the
largest over the atoms of the force standard deviation across the models, ``max_i sqrt(mean_k |F_ik - <F_i>|^2)``
(labels are not needed for it). The errors of a committee are those of its first model.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.data import Frame, read_frames, stress_to_virial
from dpa4_jax.data.store import InMemoryFrames
from dpa4_jax.train import loss as losses
from dpa4_jax.train.sources import checked_charge_spin
from dpa4_jax.train.validation import Evaluator

NO_SUBSET = "-"  # the subset of frames without a config_type
ALL = "all"


def evaluate(calc: DPA4Calculator, frames, batch_atoms: int = 1000, progress: bool = True) -> dict[str, float]:
    source = checked_charge_spin(InMemoryFrames(frames, calc.config.rcut), calc.config, "evaluated frames")
    return Evaluator(calc.model, source, calc.config.type_map, calc.config.rcut, batch_atoms)(calc.variables,
                                                                                             progress)


def predict(calc: DPA4Calculator, frames, progress: bool = True) -> list[Frame]:
    """The model's energy, forces and (for fully periodic frames, the only ones the calculator gives a stress
    for) virial of each frame, as copies of the frames with these labels, in the frames' order.

    Largest frames first: the calculator's padded size is then set by the first frame and rarely recompiles.
    """
    predictions = [None] * len(frames)
    for i in tqdm(sorted(range(len(frames)), key=lambda i: -frames[i].natoms), desc="predicting",
                  disable=not progress, leave=False):
        atoms = frames[i].to_atoms()
        atoms.calc = calc
        virial = stress_to_virial(atoms.get_stress(), atoms.cell.array) if atoms.pbc.all() else None
        predictions[i] = dataclasses.replace(frames[i], energy=atoms.get_potential_energy(),
                                             forces=atoms.get_forces(), virial=virial)
    return predictions


def error_sums(label: Frame, prediction: Frame) -> dict[str, float]:
    """A frame's sums of errors (:func:`dpa4_jax.train.loss.difference_sums`, with their counts) that
    :func:`dpa4_jax.train.loss.summarize` reads: energy per atom (eV/atom), force components (eV/A) and stress
    components (eV/A^3, periodic frames with a virial label); zero counts for missing labels."""
    none = np.zeros(0)
    de = none if label.energy is None else np.array([(prediction.energy - label.energy) / label.natoms])
    df = none if label.forces is None else prediction.forces - label.forces
    has_stress = label.virial is not None and prediction.virial is not None
    ds = (prediction.virial - label.virial) / label.volume if has_stress else none
    return {**losses.difference_sums(de, df, ds), "energy_n": de.size, "force_n": df.size, "stress_n": ds.size}


def frame_errors(labels, predictions) -> list[dict]:
    """One row per frame: its name, subset and atoms, the labelled and predicted energy per atom (eV), the energy
    error per atom (meV, signed), the force MAE and RMSE (meV/A), the virial RMSE per atom (meV) and the stress
    RMSE (GPa); NaN where the frame has no such label."""
    rows = []
    for label, pred in zip(labels, predictions):
        n, errors = label.natoms, losses.summarize(error_sums(label, pred))
        has_energy, has_virial = label.energy is not None, label.virial is not None and pred.virial is not None
        rows.append({
            "frame": label.source, "config_type": label.config_type, "natoms": n,
            "energy_label_eV_per_atom": label.energy / n if has_energy else np.nan,
            "energy_pred_eV_per_atom": pred.energy / n,
            "energy_error_meV_per_atom": 1e3 * (pred.energy - label.energy) / n if has_energy else np.nan,
            "force_mae_meV_per_A": errors["force_mae"], "force_rmse_meV_per_A": errors["force_rmse"],
            "virial_rmse_meV_per_atom": (1e3 * np.sqrt(np.mean(np.square(pred.virial - label.virial))) / n
                                         if has_virial else np.nan),
            "stress_rmse_GPa": errors["stress_rmse"],
        })
    return rows


def subset_errors(labels, predictions) -> dict[str, dict]:
    """MAE and RMSE (:func:`dpa4_jax.train.loss.summarize` units) with frame and atom counts for each
    ``config_type`` (sorted; "-" for frames without one), then for all frames ("all")."""
    sums: dict[str, Counter] = {}
    for label, pred in zip(labels, predictions):
        frame = Counter(error_sums(label, pred), frames=1, atoms=label.natoms)
        for subset in (label.config_type or NO_SUBSET, ALL):
            sums.setdefault(subset, Counter()).update(frame)
    order = sorted(set(sums) - {ALL}) + [ALL] if sums else []
    return {name: {"frames": sums[name]["frames"], "atoms": sums[name]["atoms"], **losses.summarize(sums[name])}
            for name in order}


def model_deviation(committee) -> list[dict]:
    """Per frame, from ``committee[k][i]``, the prediction (:func:`predict`) of model ``k`` for frame ``i``: the
    largest, smallest and mean over the atoms of the force deviation ``sqrt(mean_k |F_ik - mean_k F_ik|^2)``
    (eV/A; the largest is DP-GEN's ``max_devi_f``) and the standard deviation of the energy per atom (eV)."""
    rows = []
    for predictions in zip(*committee):
        forces = np.stack([p.forces for p in predictions])  # (K, N, 3)
        deviation = np.sqrt(np.mean(np.sum(np.square(forces - forces.mean(0)), axis=-1), axis=0))  # (N,)
        frame = predictions[0]
        rows.append({"frame": frame.source, "config_type": frame.config_type, "natoms": frame.natoms,
                     "max_devi_f": deviation.max(), "min_devi_f": deviation.min(), "avg_devi_f": deviation.mean(),
                     "devi_e": np.std([p.energy / frame.natoms for p in predictions])})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _print_subsets(subsets: dict[str, dict]) -> None:
    print(f"{'subset':<24}{'frames':>8}{'atoms':>9}" + "".join(f"{q + ' ' + s:>12}" for q in "EFS"
                                                          for s in ("MAE", "RMSE")))
    print(f"{'':<41}{'meV/atom':>24}{'meV/A':>24}{'GPa':>24}")
    for name, row in subsets.items():
        values = [row[f"{q}_{s}"] for q in ("energy", "force", "stress") for s in ("mae", "rmse")]
        print(f"{name:<24}{row['frames']:>8}{row['atoms']:>9}"
              + "".join(f"{'-':>12}" if np.isnan(v) else f"{v:>12.4f}" for v in values))


def _print_deviation(rows: list[dict]) -> None:
    print(f"{'frame':<40}{'atoms':>7}{'max_devi_f':>12}{'min_devi_f':>12}{'avg_devi_f':>12}{'devi_e':>12}")
    for row in rows:
        print(f"{row['frame']:<40}{row['natoms']:>7}" + "".join(f"{row[k]:>12.5f}" for k in (
            "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e")))
    print(f"model deviation (eV/A): max_devi_f largest {max(r['max_devi_f'] for r in rows):.5f}, "
          f"mean {np.mean([r['max_devi_f'] for r in rows]):.5f} over {len(rows)} frames")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="work directory of train.py (or its model/ directory, or a DeePMD-kit model file); "
                        "repeat it for a committee")
    p.add_argument("--committee", nargs="+", default=[], metavar="CHECKPOINT",
                   help="several work directories: the model deviation across them (after any --checkpoint)")
    p.add_argument("--data", required=True, help="extxyz file, DeePMD system(s) or MPtrj JSON")
    p.add_argument("--format", default=None, help="extxyz, deepmd or mptrj (default: from the path)")
    p.add_argument("--energy-key", default=None, help="extxyz energy key, e.g. REF_energy")
    p.add_argument("--forces-key", default=None)
    p.add_argument("--stress-key", default=None)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--output", type=Path, default=None, metavar="PREFIX",
                   help="write PREFIX.errors.csv, PREFIX.subsets.csv and, for a committee, PREFIX.model_devi.csv")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    models = args.checkpoint + args.committee
    if not models:
        p.error("give a model: --checkpoint DIR, or --committee DIR DIR ...")
    keys = {k: v for k, v in dict(energy_key=args.energy_key, forces_key=args.forces_key,
                                   stress_key=args.stress_key).items() if v is not None}
    frames = list(itertools.islice(read_frames(args.data, format=args.format, **keys), args.max_frames))
    print(f"{args.data}: {len(frames)} frames, {sum(f.natoms for f in frames)} atoms")
    committee = [predict(DPA4Calculator.load(model), frames) for model in models]
    output = (lambda suffix: Path(f"{args.output}.{suffix}.csv")) if args.output else None
    if any(f.energy is not None or f.forces is not None for f in frames):
        print(f"errors of {models[0]}:")
        subsets = subset_errors(frames, committee[0])
        _print_subsets(subsets)
        if output:
            write_csv(output("errors"), frame_errors(frames, committee[0]))
            write_csv(output("subsets"), [{"subset": name, **row} for name, row in subsets.items()])
    elif len(models) == 1:
        print("no energy or force labels: no errors (a committee's deviation needs none)")
    if len(models) > 1:
        deviation = model_deviation(committee)
        _print_deviation(deviation)
        if output:
            write_csv(output("model_devi"), deviation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
