"""python -m dpa4_jax.evaluate: per-frame errors, the per-subset table and a committee's model deviation."""

import csv
import dataclasses

import numpy as np
import pytest
import yaml
from conftest import make_calc

from dpa4_jax import checkpoint, evaluate
from dpa4_jax.data import make_emt_dataset, read_frames


def save_checkpoint(calc, workdir):
    """A work directory that ``DPA4Calculator.from_checkpoint`` reads, without training."""
    model = calc.config.to_dict()
    text = yaml.safe_dump({"model": model, "training": {"dtype": calc.dtype}})
    checkpoint.save_model(workdir, calc.variables, text)
    return workdir


@pytest.fixture(scope="module")
def frames():
    """Six EMT crystals of Cu and Au (the tiny model's elements), 4-27 atoms: the pure ones in subsets "Cu" and
    "Au", the alloy without a config_type."""
    emt = make_emt_dataset(25, seed=3)
    chosen = [emt[i] for i in (1, 13, 17, 8, 24, 18)]
    subset = {(29,): "Cu", (79,): "Au"}
    return [dataclasses.replace(f, config_type=subset.get(tuple(np.unique(f.numbers)), "")) for f in chosen]


@pytest.fixture(scope="module")
def predictions(tiny_calc, frames):
    return evaluate.predict(tiny_calc, frames, progress=False)


def direct(calc, frame):
    atoms = frame.to_atoms()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)


def test_per_frame_errors_equal_a_direct_calculation(tiny_calc, frames, predictions):
    rows = evaluate.frame_errors(frames, predictions)
    assert [r["frame"] for r in rows] == [f.source for f in frames]  # the frames' order, not the evaluation's
    for frame, row in zip(frames, rows):
        energy, forces, stress = direct(tiny_calc, frame)
        n, df = frame.natoms, forces - frame.forces
        assert row["natoms"] == n and row["config_type"] == frame.config_type
        np.testing.assert_allclose(row["energy_label_eV_per_atom"], frame.energy / n, rtol=1e-12)
        np.testing.assert_allclose(row["energy_pred_eV_per_atom"], energy / n, rtol=1e-12)
        np.testing.assert_allclose(row["energy_error_meV_per_atom"], 1e3 * (energy - frame.energy) / n, rtol=1e-9)
        np.testing.assert_allclose(row["force_mae_meV_per_A"], 1e3 * np.mean(np.abs(df)), rtol=1e-9)
        np.testing.assert_allclose(row["force_rmse_meV_per_A"], 1e3 * np.sqrt(np.mean(df**2)), rtol=1e-9)
        virial = -frame.volume * stress  # dpa4_jax.data.frame's convention
        np.testing.assert_allclose(row["virial_rmse_meV_per_atom"],
                                   1e3 * np.sqrt(np.mean((virial - frame.virial) ** 2)) / n, rtol=1e-9)
        assert row["force_rmse_meV_per_A"] > row["force_mae_meV_per_A"] > 0


def test_subset_table_groups_frames_by_config_type(frames, predictions):
    table = evaluate.subset_errors(frames, predictions)
    assert list(table) == ["-", "Au", "Cu", "all"]
    rows = evaluate.frame_errors(frames, predictions)
    for name, members in (("Au", [r for r in rows if r["config_type"] == "Au"]),
                          ("Cu", [r for r in rows if r["config_type"] == "Cu"]),
                          ("-", [r for r in rows if not r["config_type"]]), ("all", rows)):
        atoms = np.array([r["natoms"] for r in members])
        energy = np.array([r["energy_error_meV_per_atom"] for r in members])
        force_sq = np.array([r["force_rmse_meV_per_A"] ** 2 for r in members])  # mean over each frame's 3N
        assert table[name]["frames"] == len(members) and table[name]["atoms"] == atoms.sum()
        np.testing.assert_allclose(table[name]["energy_mae"], np.mean(np.abs(energy)), rtol=1e-9)
        np.testing.assert_allclose(table[name]["energy_rmse"], np.sqrt(np.mean(energy**2)), rtol=1e-9)
        np.testing.assert_allclose(table[name]["force_rmse"], np.sqrt(np.sum(force_sq * atoms) / atoms.sum()),
                                   rtol=1e-9)
    assert len({table[name]["energy_mae"] for name in ("-", "Au", "Cu")}) == 3


def test_committee_deviation(frames, predictions):
    unlabelled = [dataclasses.replace(f, energy=None, forces=None, virial=None) for f in frames]
    other = evaluate.predict(make_calc(seed=1), unlabelled, progress=False)  # same architecture: no compilation
    same = evaluate.model_deviation([predictions, predictions])
    assert all(r[k] == 0 for r in same for k in ("max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"))
    pair = evaluate.model_deviation([predictions, other])
    for row, a, b in zip(pair, predictions, other):
        # Two models: each force is |F_a - F_b| / 2 from their mean, so the deviation of atom i is that.
        by_hand = np.linalg.norm(a.forces - b.forces, axis=-1) / 2
        np.testing.assert_allclose([row["max_devi_f"], row["min_devi_f"], row["avg_devi_f"]],
                                   [by_hand.max(), by_hand.min(), by_hand.mean()], rtol=1e-12)
        np.testing.assert_allclose(row["devi_e"], abs(a.energy - b.energy) / a.natoms / 2, rtol=1e-12)
        assert row["max_devi_f"] > 0


def test_cli_writes_errors_subsets_and_deviation(tiny_calc, frames, tmp_path, capsys):
    import ase.io

    data = tmp_path / "test.extxyz"
    ase.io.write(data, [f.to_atoms() for f in frames], format="extxyz")
    runs = [save_checkpoint(calc, tmp_path / name) for name, calc in (("a", tiny_calc), ("b", make_calc(seed=1)))]
    assert evaluate.main(["--committee", *map(str, runs), "--data", str(data), "--output", str(tmp_path / "out")]) == 0
    read = list(read_frames(data))
    assert [f.config_type for f in read] == [f.config_type for f in frames]

    def table(suffix):
        with open(tmp_path / f"out.{suffix}.csv") as fh:
            return list(csv.DictReader(fh))

    errors, expected = table("errors"), evaluate.frame_errors(read, evaluate.predict(tiny_calc, read, False))
    assert [r["frame"] for r in errors] == [f.source for f in read]
    np.testing.assert_allclose([float(r["force_rmse_meV_per_A"]) for r in errors],
                               [r["force_rmse_meV_per_A"] for r in expected], rtol=1e-9)
    assert [r["subset"] for r in table("subsets")] == ["-", "Au", "Cu", "all"]
    assert len(table("model_devi")) == len(frames) and all(float(r["max_devi_f"]) > 0 for r in table("model_devi"))
    out = capsys.readouterr().out
    assert "errors of" in out and "max_devi_f" in out and out.count("\nCu ") == 1
