"""Matbench Discovery with a DPA4 model: relax the WBM initial structures, then score the hull distances.

    python -m dpa4_jax.matbench discovery --model RUN --output results/dpa4 [--data-dir DIR] [--fmax 0.05]
    python -m dpa4_jax.matbench score --predictions 'results/dpa4*.csv.gz' [--data-dir DIR] [--output metrics.json]

``discovery`` relaxes every WBM initial structure (``DataFiles.wbm_initial_atoms``) with the protocol's settings,
ASE's FIRE on a ``FrechetCellFilter``, ``fmax`` 0.05 eV/A, at most 500 steps (:func:`dpa4_jax.relax.relax`), and
writes, as the leaderboard's model submissions do:

- ``PREFIX.extxyz``: the relaxed structures with energies, forces, stresses, steps and convergence (resumable:
  a killed run started again skips the structures done);
- ``PREFIX.csv.gz``: ``material_id``, the formation energy per atom ``e_form_per_atom_dpa4`` (the model's
  energy and relaxed structure put into the WBM ``ComputedStructureEntry``, pymatgen's
  ``MaterialsProject2020Compatibility`` corrections, the package's ``get_e_form_per_atom`` on the MP elemental
  references), the raw energy, steps and convergence;
- ``PREFIX.json.gz``: ``material_id`` and the relaxed pymatgen structure.

Several processes (``jax.distributed``) each relax every P-th structure and write ``PREFIX.pI-of-P.*``.

``score`` reads such predictions (a glob, ``glob_to_df``), predicts each hull distance as
``e_above_hull_dft + e_form_pred - e_form_dft`` with the WBM summary (``DataFiles.wbm_summary``), drops
predictions more than 5 eV/atom from DFT as the leaderboard does, and prints the package's ``stable_metrics``
(F1, DAF, precision, recall, accuracy, MAE, RMSE, R2) on the full test set and on the unique prototypes, with
the RMSD of the relaxed structures from the DFT ones (pymatgen's ``StructureMatcher(stol=1.0, scale=False)``,
the leaderboard's setting). Materials without a prediction count as predicted unstable.

The data files are the user's download, found where ``matbench_discovery.data.DataFiles`` looks
(``MATBENCH_DISCOVERY_CACHE_DIR``, set by ``--data-dir``). Needs the ``matbench`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME = "dpa4"
PRED_COL = f"e_form_per_atom_{MODEL_NAME}"
ENERGY_COL = f"{MODEL_NAME}_energy"
STRUCT_COL = f"{MODEL_NAME}_structure"
UNIQUE_PROTOTYPE = "unique_prototype"  # the WBM summary's column (pymatviz Key.uniq_proto when it was written)
MAX_ERROR = 5.0  # eV/atom: the leaderboard drops predictions this far from DFT (load_df_wbm_with_preds)
SUBSETS = {"full": "full test set", "unique_prototypes": "unique prototypes"}


def data_module(data_dir: str | Path | None):
    """``matbench_discovery.data`` reading the files under ``data_dir`` (``MATBENCH_DISCOVERY_CACHE_DIR``). The
    package fixes its directory and loads the WBM summary on import: a process that imported it for another
    directory reloads it (and ``matbench_discovery.energy``, which loads the MP references on import)."""
    import importlib

    changed = data_dir is not None and os.environ.get("MATBENCH_DISCOVERY_CACHE_DIR") != str(data_dir)
    if data_dir is not None:
        os.environ["MATBENCH_DISCOVERY_CACHE_DIR"] = str(data_dir)
    try:
        if changed and "matbench_discovery.data" in sys.modules:
            data = importlib.reload(sys.modules["matbench_discovery.data"])
            if "matbench_discovery.energy" in sys.modules:
                importlib.reload(sys.modules["matbench_discovery.energy"])
        else:
            import matbench_discovery.data as data
    except FileNotFoundError as error:
        where = data_dir or os.environ.get("MATBENCH_DISCOVERY_CACHE_DIR", "matbench-discovery's cache directory")
        raise FileNotFoundError(f"the Matbench Discovery data are not in {where} ({error}); download them "
                                "(matbench_discovery.data.DataFiles names the files) and give --data-dir") from None
    return data


def require(*files) -> None:
    """Each ``DataFiles`` member must be on disk (``.path`` would try to download it)."""
    for file in files:
        if not os.path.isfile(str(file)):
            raise FileNotFoundError(f"Matbench Discovery file {file.name} is missing: {file} (download it from "
                                    f"{file.url})")


# ------------------------------------------------------------------------------------------------ discovery
def wbm_entries(data, material_ids) -> dict:
    """``{material_id: ComputedStructureEntry}`` of the WBM DFT relaxations (for their parameters and structures)."""
    import pandas as pd
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    df = pd.read_json(str(data.DataFiles.wbm_computed_structure_entries)).set_index("material_id")
    missing = sorted(set(material_ids) - set(df.index))
    if missing:
        raise KeyError(f"{data.DataFiles.wbm_computed_structure_entries}: no entry for {missing[:5]}")
    return {i: ComputedStructureEntry.from_dict(df.loc[i, "computed_structure_entry"]) for i in material_ids}


def formation_energies(data, relaxed) -> list[float]:
    """Per relaxed structure, the MP2020-corrected formation energy per atom (NaN where it failed or where the
    compatibility scheme rejects the entry): the model's energy and relaxed structure in the WBM entry."""
    from matbench_discovery.energy import get_e_form_per_atom
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    good = [a for a in relaxed if "error" not in a.info]
    dft = wbm_entries(data, [a.info["material_id"] for a in good])
    entries = []
    for atoms in good:
        reference = dft[atoms.info["material_id"]]
        entries.append(ComputedStructureEntry(AseAtomsAdaptor.get_structure(atoms), atoms.get_potential_energy(),
                                              parameters=reference.parameters, data=reference.data,
                                              entry_id=atoms.info["material_id"]))
    corrected = MaterialsProject2020Compatibility().process_entries(entries, clean=True, verbose=False)
    e_form = {entry.entry_id: get_e_form_per_atom(entry) for entry in corrected}
    return [e_form.get(a.info.get("material_id"), np.nan) for a in relaxed]


def write_predictions(data, relaxed, prefix: Path) -> None:
    """``PREFIX.csv.gz`` (formation energies) and ``PREFIX.json.gz`` (relaxed structures), each written atomically."""
    import pandas as pd
    from pymatgen.io.ase import AseAtomsAdaptor

    from dpa4_jax.relax.cli import write_atomically

    ok = ["error" not in a.info for a in relaxed]
    df = pd.DataFrame({
        "material_id": [a.info["material_id"] for a in relaxed],
        PRED_COL: formation_energies(data, relaxed),
        ENERGY_COL: [a.get_potential_energy() if good else np.nan for a, good in zip(relaxed, ok)],
        "n_steps": [a.info["steps"] for a in relaxed],
        "converged": [bool(a.info["converged"]) for a in relaxed],
        "error": [a.info.get("error", "") for a in relaxed],
    })
    write_atomically(Path(f"{prefix}.csv.gz"), lambda tmp: df.to_csv(tmp, index=False, compression="gzip"))
    structures = pd.DataFrame({"material_id": df["material_id"],
                               STRUCT_COL: [AseAtomsAdaptor.get_structure(a) if good else None
                                            for a, good in zip(relaxed, ok)]})
    write_atomically(Path(f"{prefix}.json.gz"), lambda tmp: structures.to_json(
        tmp, default_handler=data.as_dict_handler, compression="gzip"))


def discovery(argv) -> int:
    from dpa4_jax.relax import cli

    p = argparse.ArgumentParser(prog="python -m dpa4_jax.matbench discovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_relax_options(p)
    p.add_argument("--output", required=True, type=Path, help="prefix of the output files")
    p.add_argument("--data-dir", type=Path, default=None, help="the Matbench Discovery data (default: the "
                   "package's cache, MATBENCH_DISCOVERY_CACHE_DIR)")
    p.add_argument("--limit", type=int, default=None, help="relax only the first N WBM structures")
    args = p.parse_args(argv)
    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.logs import setup_logging
    from dpa4_jax.relax import relax

    setup_logging()
    data = data_module(args.data_dir)
    require(data.DataFiles.wbm_initial_atoms, data.DataFiles.wbm_computed_structure_entries,
            data.DataFiles.mp_elemental_ref_entries)
    process, processes = cli.this_process()
    prefix = cli.shard_path(args.output, process, processes)
    relaxed_file = Path(f"{prefix}.extxyz")
    journal = Path(f"{relaxed_file}.journal")
    if relaxed_file.exists() and not journal.exists():
        import ase.io

        relaxed = ase.io.read(relaxed_file, index=":")
        print(f"{relaxed_file}: {len(relaxed)} structures relaxed before")
    else:
        import ase.io

        structures = data.ase_atoms_from_zip(str(data.DataFiles.wbm_initial_atoms), limit=args.limit)
        mine = structures[process::processes]
        calc = DPA4Calculator.load(args.model, dtype=args.dtype)
        relaxed = relax(calc, mine, fmax=args.fmax, max_steps=args.max_steps, cell_filter=True, journal=journal,
                        **cli.batch_options(args))
        relaxed_file.parent.mkdir(parents=True, exist_ok=True)
        cli.write_atomically(relaxed_file, lambda tmp: ase.io.write(tmp, relaxed, format="extxyz"))
        journal.unlink()
        print(f"{relaxed_file}: {len(relaxed)} structures, {sum(a.info['converged'] for a in relaxed)} converged, "
              f"{len(relaxed.errors)} failed, {relaxed.steps} FIRE steps in {relaxed.seconds:.0f} s, "
              f"{relaxed.compilations} compilation(s)")
    write_predictions(data, relaxed, prefix)
    print(f"predictions: {prefix}.csv.gz ({PRED_COL}), {prefix}.json.gz ({STRUCT_COL})")
    return 0


# ------------------------------------------------------------------------------------------------ score
def hull_distance_predictions(df_wbm, e_form_pred):
    """``(true, predicted)`` hull distances over the WBM summary's materials; a prediction more than ``MAX_ERROR``
    from DFT, or none, is NaN (counted as unstable by ``stable_metrics``)."""
    from matbench_discovery.enums import MbdKey

    e_form_pred = e_form_pred.reindex(df_wbm.index)
    e_form_dft = df_wbm[MbdKey.e_form_dft]
    e_form_pred = e_form_pred.where((e_form_pred - e_form_dft).abs() <= MAX_ERROR)
    each_true = df_wbm[MbdKey.each_true]
    return each_true, each_true + e_form_pred - e_form_dft


def structure_rmsd(data, predicted) -> dict:
    """``{material_id: RMSD}`` of the relaxed structures from the DFT-relaxed ones (NaN: no match)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    dft = wbm_entries(data, list(predicted))
    matcher = StructureMatcher(stol=1.0, scale=False)  # the leaderboard's setting for distances from DFT
    out = {}
    for material_id, structure in predicted.items():
        match = matcher.get_rms_dist(Structure.from_dict(structure), dft[material_id].structure)
        out[material_id] = np.nan if match is None else float(match[0])
    return out


def score(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m dpa4_jax.matbench score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="glob of discovery's PREFIX*.csv.gz files")
    p.add_argument("--structures", default=None, help="glob of discovery's PREFIX*.json.gz files (default: the "
                   "predictions' glob with .json.gz): the structure RMSD")
    p.add_argument("--data-dir", type=Path, default=None, help="the Matbench Discovery data")
    p.add_argument("--output", type=Path, default=None, help="write the metrics to this JSON file")
    args = p.parse_args(argv)
    data = data_module(args.data_dir)
    from matbench_discovery.metrics import stable_metrics

    preds = data.glob_to_df(args.predictions, pbar=False).set_index("material_id")
    df_wbm = data.df_wbm
    unknown = sorted(set(preds.index) - set(df_wbm.index))
    if unknown:
        raise KeyError(f"{args.predictions}: materials not in the WBM summary: {unknown[:5]}")
    each_true, each_pred = hull_distance_predictions(df_wbm, preds[PRED_COL])
    rmsd = None
    structures = args.structures or args.predictions.replace(".csv.gz", ".json.gz")
    if structures != args.predictions:
        json_df = data.glob_to_df(structures, pbar=False).set_index("material_id")[STRUCT_COL].dropna()
        rmsd = structure_rmsd(data, json_df.to_dict())
    masks = {"full": np.ones(len(df_wbm), bool), "unique_prototypes": df_wbm[UNIQUE_PROTOTYPE].to_numpy(bool)}
    results = {}
    for name, mask in masks.items():
        metrics = stable_metrics(each_true[mask], each_pred[mask], fillna=True)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(materials=int(mask.sum()), predicted=int(each_pred[mask].notna().sum()))
        if rmsd is not None:
            values = np.array([rmsd.get(i, np.nan) for i in df_wbm.index[mask] if i in rmsd])
            metrics.update(RMSD=float(np.nanmean(values)) if np.isfinite(values).any() else np.nan,
                           rmsd_matched=int(np.isfinite(values).sum()))
        results[name] = metrics
    print_table(results)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    keys = ["F1", "DAF", "Precision", "Recall", "Accuracy", "MAE", "RMSE", "R2", "RMSD"]
    print(f"{'subset':<20}{'materials':>10}{'predicted':>10}" + "".join(f"{k:>10}" for k in keys))
    for name, m in results.items():
        print(f"{SUBSETS[name]:<20}{m['materials']:>10}{m['predicted']:>10}"
              + "".join(f"{m[k]:>10.3f}" if k in m else f"{'-':>10}" for k in keys))


def main(command: str, argv) -> int:
    return {"discovery": discovery, "score": score}[command](list(argv))
