"""dpa4_jax.relax: the batched FIRE follows ASE's FIRE(FrechetCellFilter(atoms)) with DPA4Calculator structure by
structure; killed runs resume; compilations stay bounded; bad structures are reported without stopping the rest."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import yaml
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from conftest import SMALL_ZBL, cu_au_cell, make_calc, relaxation_set, strained
from matbench_discovery.enums import MbdKey
from matbench_discovery.metrics import stable_metrics
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp.sets import MPRelaxSet

from dpa4_jax import checkpoint, physics
from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.elements import species_indices
from dpa4_jax.matbench import __main__ as matbench
from dpa4_jax.matbench import discovery
from dpa4_jax.relax import cli as relax_cli
from dpa4_jax.relax import relax
from dpa4_jax.relax.step import WithinCutoff

FMAX, STEPS = 0.1, 20
# One padded budget for every batched run of this file (one compilation per cell-filter mode): 24 atoms, 3
# structures at a time; a 0.3 A skin so that lists are rebuilt on the way.
BATCH = dict(batch_atoms=24, batch_edges=768, skin=0.3, progress=False)


@pytest.fixture(scope="module")
def calc():
    return make_calc(seed=3, **SMALL_ZBL)


@pytest.fixture(scope="module")
def ase_calc(calc):
    """The same model in a calculator with a wide capacity margin: one compilation for the ASE runs."""
    return DPA4Calculator(calc.config, calc.variables, dtype="float64", capacity_multiplier=1.6)


def ase_relax(calc, atoms, cell_filter):
    atoms = atoms.copy()
    atoms.calc = calc
    opt = FIRE(FrechetCellFilter(atoms) if cell_filter else atoms, logfile=None)
    converged = opt.run(fmax=FMAX, steps=STEPS)
    return atoms, opt.nsteps, converged


@pytest.fixture(scope="module")
def relaxed(calc):
    return relax(calc, relaxation_set(), FMAX, STEPS, **BATCH)


def assert_same_path(batched, reference, steps, converged):
    n = len(reference)
    assert batched.info["steps"] == steps and batched.info["converged"] == converged
    assert abs(batched.get_potential_energy() - reference.get_potential_energy()) / n < 1e-6
    np.testing.assert_allclose(batched.positions, reference.positions, atol=1e-8)
    np.testing.assert_allclose(batched.cell.array, reference.cell.array, atol=1e-8)
    np.testing.assert_allclose(batched.get_forces(), reference.get_forces(), atol=1e-8)
    if reference.pbc.all():
        np.testing.assert_allclose(batched.get_stress(), reference.get_stress(), atol=1e-8)


@pytest.mark.parametrize("cell_filter", [True, False], ids=["frechet-filter", "positions-only"])
def test_relax_follows_ase_fire(calc, ase_calc, relaxed, cell_filter):
    inputs = relaxation_set(periodic=cell_filter)
    batched = relaxed if cell_filter else relax(calc, inputs, FMAX, STEPS, cell_filter=False, **BATCH)
    assert batched.rebuilds > 0  # the skin was crossed and lists were rebuilt on the way
    outcomes = []
    for atoms, result in zip(inputs, batched):
        reference, steps, converged = ase_relax(ase_calc, atoms, cell_filter)
        assert_same_path(result, reference, steps, converged)
        outcomes.append(converged)
        if not cell_filter:
            np.testing.assert_array_equal(result.cell.array, atoms.cell.array)
    assert any(outcomes) and not all(outcomes)  # structures converged and ran out of steps in the same batch


def test_killed_run_resumes_to_the_same_results(calc, relaxed, tmp_path):
    journal = tmp_path / "run.journal"

    done = []

    def killed(index, atoms):
        done.append(index)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        relax(calc, relaxation_set(), FMAX, STEPS, journal=journal, on_result=killed, **BATCH)
    with open(journal, "ab") as fh:
        fh.write(b'{"index": 0, "key": "cut by the ki')  # a kill in the middle of a line
    resumed = relax(calc, relaxation_set(), FMAX, STEPS, journal=journal, **BATCH)
    assert resumed.steps < relaxed.steps  # the two done were not relaxed again
    for a, b in zip(resumed, relaxed):
        assert a.info["steps"] == b.info["steps"] and a.info["converged"] == b.info["converged"]
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
        np.testing.assert_allclose(a.get_potential_energy(), b.get_potential_energy(), rtol=1e-12)
    with pytest.raises(ValueError, match="other settings"):
        relax(calc, relaxation_set(), FMAX / 2, STEPS, journal=journal, **BATCH)


def test_bad_structures_are_reported_by_index_and_compilations_stay_bounded(calc):
    """Bad structures among good ones of many sizes (3-16 atoms): the bad ones are named by index, the good
    ones relaxed in one compiled shape."""
    good = [bulk("Cu", "fcc", a=3.7, cubic=True).repeat((n, 1, 1))[: 4 * n - k] for n in (1, 2, 3, 4) for k in (0, 1)]
    for i, atoms in enumerate(good):
        atoms.rattle(0.05, seed=i)
    nan = cu_au_cell(seed=7)
    nan.positions[2, 1] = np.nan
    iron = cu_au_cell(seed=8)
    iron.numbers[1] = 26
    overlap = cu_au_cell(seed=9)
    overlap.positions[3] = overlap.positions[0] + [0.02, 0.0, 0.0]
    inputs = good[:3] + [nan, iron] + good[3:6] + [overlap] + good[6:]
    step_fn = _compiled_for(calc)
    before = step_fn._cache_size()
    out = relax(calc, inputs, FMAX, 8, **BATCH)
    assert step_fn._cache_size() - before == out.compilations <= 1
    assert sorted(out.errors) == [3, 4, 8]
    assert "structure 3" in out.errors[3] and "non-finite" in out.errors[3]
    assert "Fe" in out.errors[4] and "overlapping" in out.errors[8]
    for i, atoms in enumerate(out):
        if i in out.errors:
            assert out[i].info["error"] == out.errors[i] and atoms.calc is None
        else:
            assert atoms.info["steps"] <= 8 and np.isfinite(atoms.get_potential_energy())


def _compiled_for(calc):
    from dpa4_jax.relax.fire import FireParameters
    from dpa4_jax.relax.step import compiled_step
    from dpa4_jax.train import distributed

    return compiled_step(WithinCutoff(calc.model, calc.config.rcut), True, BATCH["skin"], FireParameters(),
                         distributed.data_mesh(jax.local_devices()))


def test_edges_beyond_the_cutoff_contribute_nothing(calc):
    """A neighbour list at rcut + 1 A with the pairs beyond rcut masked gives the energy, forces and virial of the
    list at rcut; unmasked, the ZBL term of those pairs (not switched off at rcut) would change the energy."""
    atoms = strained(cu_au_cell(seed=3), [[1.02, 0.01, 0.0], [0.0, 0.99, 0.0], [0.0, 0.02, 1.0]])
    cfg = calc.config
    species = species_indices(atoms.numbers, cfg.type_map)
    lists = [graphs.structure_graph(species, atoms.positions, atoms.cell.array, atoms.pbc, r) for r in (cfg.rcut,
                                                                                                       cfg.rcut + 1.0)]
    budget = graphs.Budget(8, graphs.round_up(int(lists[1].n_edge[0]), 64), 2)
    assert lists[1].n_edge[0] > lists[0].n_edge[0]

    @jax.jit
    def both(graph):
        masked = physics.energy_forces_virial(WithinCutoff(calc.model, cfg.rcut), calc.variables, graph)
        return masked, physics.energy(calc.model, calc.variables, graph)

    (at_rcut, _), (beyond, unmasked_energy) = [both(jax.tree.map(jnp.asarray, graphs.pad(g, budget))) for g in lists]
    for key in ("energy", "forces", "virial"):
        np.testing.assert_allclose(beyond[key], at_rcut[key], rtol=1e-12, atol=1e-12)
    assert abs(unmasked_energy[0] - at_rcut["energy"][0]) > 1e-6


def save_model(calc, workdir):
    """A model directory that ``DPA4Calculator.from_checkpoint`` (and so ``--model``) reads."""
    text = yaml.safe_dump({"model": calc.config.to_dict(), "training": {"dtype": calc.dtype}})
    checkpoint.save_model(workdir, calc.variables, text)
    return workdir / checkpoint.MODEL


def test_command_line_relaxes_a_file(calc, relaxed, tmp_path):
    inputs = relaxation_set()
    ase.io.write(tmp_path / "in.extxyz", inputs)
    args = ["--model", str(save_model(calc, tmp_path / "run")), "--input", str(tmp_path / "in.extxyz"), "--output",
            str(tmp_path / "out.extxyz"), "--fmax", str(FMAX), "--max-steps", str(STEPS), "--skin", "0.3",
            "--batch-atoms", "24", "--batch-edges", "768", "--no-progress"]
    assert relax_cli.main(args) == 0
    out = ase.io.read(tmp_path / "out.extxyz", index=":")
    assert not (tmp_path / "out.extxyz.journal").exists()
    for i, (a, b) in enumerate(zip(out, relaxed)):
        assert a.info["index"] == i and a.info["steps"] == b.info["steps"] and a.info["converged"] == b.info["converged"]
        # extxyz keeps 8 decimals
        np.testing.assert_allclose(a.get_potential_energy(), b.get_potential_energy(), atol=1e-8)
        np.testing.assert_allclose(a.get_stress(), b.get_stress(), atol=1e-8)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)



def test_processes_each_relax_their_share(calc, relaxed, tmp_path):
    """Two processes connected by ``jax.distributed`` (as ``srun`` launches them): each relaxes every second
    structure of the file into its own shard, as one process relaxes them."""
    ase.io.write(tmp_path / "in.extxyz", relaxation_set())
    args = [sys.executable, "-m", "dpa4_jax.relax", "--model", str(save_model(calc, tmp_path / "run")),
            "--input", str(tmp_path / "in.extxyz"), "--output", str(tmp_path / "out.extxyz"), "--fmax", str(FMAX),
            "--max-steps", str(STEPS), "--skin", "0.3", "--batch-atoms", "24", "--batch-edges", "768", "--no-progress"]
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    runs = [subprocess.Popen(args, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for process in range(2):
        shard = ase.io.read(tmp_path / f"out.p{process}-of-2.extxyz", index=":")
        assert [a.info["index"] for a in shard] == list(range(process, len(relaxed), 2))
        for a in shard:
            b = relaxed[a.info["index"]]
            assert (a.info["steps"], a.info["converged"]) == (b.info["steps"], b.info["converged"])
            np.testing.assert_allclose(a.get_potential_energy(), b.get_potential_energy(), atol=1e-8)
            np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)

# ---------------------------------------------------------------------------------- Matbench Discovery
# Elemental reference energies (eV/atom) near the model's own: its formation energies are then within 0.01 eV of
# zero, so the made-up DFT values below place each material in a known class (TP, FP, TN, FN, FN).
MU = {"Cu": 4.1488, "Au": 4.9470}


def write_entries(data, structures):
    """The WBM ``ComputedStructureEntry`` file: "DFT" relaxed structures (their ``material_id`` in ``info``) with
    the parameters that pymatgen's MP2020 scheme accepts for GGA runs."""
    potcars = MPRelaxSet.CONFIG["POTCAR"]
    entries = []
    for atoms in structures:
        spec = [{"titel": f"PAW_PBE {potcars[e]} 06Sep2000", "hash": None} for e in sorted(set(atoms.symbols))]
        entries.append(ComputedStructureEntry(AseAtomsAdaptor.get_structure(atoms), -4.0 * len(atoms),
                                              entry_id=atoms.info["material_id"],
                                              parameters={"run_type": "GGA", "is_hubbard": False, "hubbards": {},
                                                          "potcar_spec": spec}).as_dict())
    pd.DataFrame({"material_id": [a.info["material_id"] for a in structures], "computed_structure_entry": entries}
                 ).to_json(str(data.DataFiles.wbm_computed_structure_entries))


def wbm_like_data(root: Path):
    """A five-material stand-in for the Matbench Discovery files, in their formats: Cu, Au and two Cu-Au alloys
    (strained and rattled initial structures, the unstrained cells as "DFT" relaxed ones) and a Cu-Fe one (Fe is
    outside the model's elements: it fails and counts as predicted unstable)."""
    ids = [f"wbm-1-{i}" for i in range(1, 6)]
    relaxed_cells = []
    for symbols in ("Cu4", "Au4", "Cu2Au2", "Cu3Au", "Cu3Fe"):
        atoms = bulk("Cu", "fcc", a=3.8, cubic=True)
        atoms.symbols = symbols
        relaxed_cells.append(atoms)
    initial = []
    for i, (material_id, atoms) in enumerate(zip(ids, relaxed_cells)):
        atoms.info["material_id"] = material_id
        start = strained(atoms.copy(), [[1.03, 0.01, 0.0], [0.0, 0.98, 0.02], [0.0, 0.0, 1.01]])
        start.rattle(0.04, seed=i)
        start.info["material_id"] = material_id
        initial.append(start)
    # The summary is the one file matbench_discovery.data reads on import: its name is needed to import it.
    summary = pd.DataFrame({"material_id": ids, "formula": [a.get_chemical_formula() for a in relaxed_cells],
                            MbdKey.e_form_dft: [0.0, 0.4, -0.1, -0.2, 0.1], MbdKey.each_true: [-0.05, 0.3, 0.02, -0.01, -0.02],
                            "unique_prototype": [True, True, False, True, True]})
    (root / "wbm").mkdir(parents=True)
    summary.to_csv(root / "wbm" / "2023-12-13-wbm-summary.csv.gz", index=False)
    data = discovery.data_module(root)
    assert str(data.DataFiles.wbm_summary) == str(root / "wbm" / "2023-12-13-wbm-summary.csv.gz")
    data.ase_atoms_to_zip(initial, str(data.DataFiles.wbm_initial_atoms))
    write_entries(data, relaxed_cells)
    refs = {el: ComputedEntry(el, mu).as_dict() for el, mu in MU.items()}
    Path(str(data.DataFiles.mp_elemental_ref_entries)).parent.mkdir(parents=True)
    pd.Series(refs).to_json(str(data.DataFiles.mp_elemental_ref_entries))
    return data, summary.set_index("material_id")


def test_matbench_discovery_and_score_end_to_end(calc, tmp_path, capsys):
    data, summary = wbm_like_data(tmp_path / "data")
    model = save_model(calc, tmp_path / "run")
    prefix = tmp_path / "out" / "dpa4"
    assert matbench.main(["discovery", "--model", str(model), "--data-dir", str(tmp_path / "data"), "--output",
                          str(prefix), "--fmax", str(FMAX), "--max-steps", str(STEPS), "--skin", "0.3",
                          "--batch-atoms", "24", "--batch-edges", "768", "--no-progress"]) == 0
    relaxed = ase.io.read(f"{prefix}.extxyz", index=":")
    predictions = pd.read_csv(f"{prefix}.csv.gz").set_index("material_id")
    e_form = predictions[discovery.PRED_COL]
    for atoms in relaxed:  # Cu-Au alloys get no MP2020 correction: E_form = (E - sum_el n_el mu_el) / N
        material_id = atoms.info["material_id"]
        if material_id == "wbm-1-5":
            assert "Fe" in atoms.info["error"] and np.isnan(e_form[material_id])
            continue
        expected = (atoms.get_potential_energy() - sum(MU[s] for s in atoms.get_chemical_symbols())) / len(atoms)
        np.testing.assert_allclose(e_form[material_id], expected, atol=1e-12)
        assert atoms.info["steps"] <= STEPS

    # "DFT" structures 0.02 A from the model's relaxed ones (then StructureMatcher matches them) for the RMSD
    dft = [a.copy() for a in relaxed]
    for i, atoms in enumerate(dft):
        atoms.rattle(0.02, seed=10 + i)
    write_entries(data, dft)
    assert matbench.main(["score", "--predictions", f"{prefix}*.csv.gz", "--data-dir", str(tmp_path / "data"),
                          "--output", str(tmp_path / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    assert "F1" in printed and "unique prototypes" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    each_true = summary[MbdKey.each_true]
    each_pred = each_true + e_form.reindex(summary.index) - summary[MbdKey.e_form_dft]
    for name, mask in (("full", summary.index), ("unique_prototypes", summary.index[summary["unique_prototype"]])):
        expected = stable_metrics(each_true[mask], each_pred[mask], fillna=True)
        for key in ("F1", "DAF", "Precision", "Recall", "Accuracy", "MAE", "RMSE", "TP", "FP", "TN", "FN"):
            np.testing.assert_allclose(metrics[name][key], expected[key], rtol=1e-12)
        assert metrics[name]["predicted"] == sum(i != "wbm-1-5" for i in mask)
    assert [metrics["full"][k] for k in ("TP", "FP", "TN", "FN")] == [1, 1, 1, 2]
    matcher = StructureMatcher(stol=1.0, scale=False)
    matches = [matcher.get_rms_dist(AseAtomsAdaptor.get_structure(a), AseAtomsAdaptor.get_structure(b))
               for a, b in zip(relaxed[:4], dft[:4])]
    rmsd = [m[0] for m in matches if m is not None]
    assert metrics["full"]["rmsd_matched"] == len(rmsd) == 4
    np.testing.assert_allclose(metrics["full"]["RMSD"], np.mean(rmsd), rtol=1e-6)
