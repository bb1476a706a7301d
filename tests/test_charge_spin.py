"""A frame's total charge and spin multiplicity, for models with the charge/spin embedding (DPA4-OMol25): from
the readers through the frame store, graphs and the calculator to the model, and refused where a model needs them
and they are missing or off its tables. (Against the reference: tests/test_reference.py, "published_options".)"""

import numpy as np
import pytest
from ase.build import molecule
from conftest import make_calc

from dpa4_jax.config import Config, ConfigError, DataConfig, ModelConfig
from dpa4_jax.data import Frame, read_frames, write_extxyz
from dpa4_jax.data.store import prepare
from dpa4_jax.train.sources import read_data


def water(charge=None, spin=None, shift=0.0):
    atoms = molecule("H2O")
    atoms.positions += shift
    return Frame(atoms.numbers, atoms.positions, np.zeros((3, 3)), [False] * 3, energy=-1.0,
                 source=f"water {charge} {spin}", charge=charge, spin=spin)


def test_charge_and_spin_travel_through_extxyz_deepmd_and_the_store(tmp_path):
    frames = [water(-1, 2), water(), water(0, 3)]
    write_extxyz(frames, tmp_path / "w.xyz")
    read = list(read_frames(tmp_path / "w.xyz"))
    store = prepare(tmp_path / "w.xyz", tmp_path / "store", 3.0, workers=0, progress=False)
    system = tmp_path / "sys"
    (system / "set.000").mkdir(parents=True)
    (system / "type_map.raw").write_text("O\nH\n")
    (system / "type.raw").write_text("0\n1\n1\n")
    (system / "nopbc").write_text("")
    np.save(system / "set.000" / "coord.npy", np.stack([f.positions.reshape(-1) for f in frames[:1]]))
    np.save(system / "set.000" / "charge_spin.npy", np.array([[2.0, 1.0]]))
    (deepmd,) = read_frames(system)
    expected = [(-1, 2), (None, None), (0, 3)]
    assert [(f.charge, f.spin) for f in read] == expected
    assert [(store[i].charge, store[i].spin) for i in range(3)] == expected
    assert (deepmd.charge, deepmd.spin) == (2, 1)
    np.testing.assert_array_equal(np.isnan(store.charge_spin()), [[False] * 2, [True] * 2, [False] * 2])
    with pytest.raises(ValueError, match=r"spin 1\.5 is not a whole number"):
        water(0, 1.5)


def test_the_calculator_reads_atoms_info_and_recomputes_when_it_changes():
    calc = make_calc(add_chg_spin_ebd=True, default_chg_spin=(0, 1), type_map=("H", "O"))
    atoms = molecule("H2O")
    atoms.calc = calc
    default = atoms.get_potential_energy()
    atoms.info.update(charge=0, spin=1)  # the default, given
    assert atoms.get_potential_energy() == pytest.approx(default, rel=1e-12)
    atoms.info.update(charge=-1, spin=2)
    anion = atoms.get_potential_energy()
    atoms.info["spin"] = 4
    assert len({round(e, 9) for e in (default, anion, atoms.get_potential_energy())}) == 3
    atoms.info["charge"] = 150
    with pytest.raises(ValueError, match=r"charge 150 must be a whole number in \[-100, 100\)"):
        atoms.get_potential_energy()


def test_a_model_without_a_default_needs_them_from_every_structure(tmp_path):
    no_default = make_calc(add_chg_spin_ebd=True, type_map=("H", "O"))
    atoms = molecule("H2O")
    atoms.calc = no_default
    with pytest.raises(ValueError, match=r"H2O \(3 atoms\): the model embeds the total charge and spin"):
        atoms.get_potential_energy()
    write_extxyz([water(0, 1), water(shift=0.1), water(1, 2, shift=0.2)], tmp_path / "w.xyz")
    config = Config(model=ModelConfig(type_map=("H", "O"), rcut=3.0, channels=8, lmax=1, n_blocks=1,
                                      mixing_layers=1, add_chg_spin_ebd=True),
                    data=DataConfig(train=str(tmp_path / "w.xyz"), val_fraction=0.0))
    with pytest.raises(ConfigError, match=r"data\.train: .*w\.xyz:1: the model embeds the total charge"):
        read_data(config, tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model\.default_chg_spin: set without model\.add_chg_spin_ebd"):
        ModelConfig(type_map=("H",), default_chg_spin=(0, 1))


def test_training_reads_them_and_the_trained_model_keeps_them(tmp_path):
    """Two steps on charged and neutral water (the batches carry each frame's pair): the saved model, loaded
    back, gives different energies for the two states of one geometry."""
    import yaml

    from dpa4_jax.calculator import DPA4Calculator
    from dpa4_jax.config import LossConfig, OptimizerConfig, TrainingConfig
    from dpa4_jax.train.loop import fit

    frames = [water(c, s, shift=0.02 * k) for k, (c, s) in enumerate([(0, 1), (-1, 2), (1, 2), (0, 3)] * 2)]
    write_extxyz(frames, tmp_path / "w.xyz")
    model = ModelConfig(type_map=("H", "O"), rcut=3.0, channels=8, n_radial=4, lmax=1, n_blocks=1,
                        mixing_layers=1, sel=10, add_chg_spin_ebd=True, default_chg_spin=(0, 1))
    config = Config(model=model, data=DataConfig(train=str(tmp_path / "w.xyz"), val_fraction=0.25),
                    training=TrainingConfig(steps=2, batch_atoms=6, validate_every=2, dtype="float64", n_budgets=1),
                    optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1), loss=LossConfig())
    fit(config, tmp_path / "run", yaml.safe_dump({"model": model.to_dict()}), progress=False)
    atoms = frames[0].to_atoms()
    atoms.calc = DPA4Calculator.load(tmp_path / "run")
    neutral = atoms.get_potential_energy()
    atoms.info.update(charge=-1, spin=2)
    assert atoms.get_potential_energy() != pytest.approx(neutral, rel=1e-9)


def test_batched_forces_relaxation_and_evaluation_read_them_as_the_calculator_does():
    """``batched.forces_of_many`` and ``relax`` build their graphs as the calculator does (``graph.atoms_graph``):
    each structure's own charge and spin, the same energies and forces; ``evaluate`` names a frame the model
    cannot read."""
    from dpa4_jax.batched import forces_of_many
    from dpa4_jax.evaluate import evaluate
    from dpa4_jax.relax import relax

    calc = make_calc(add_chg_spin_ebd=True, default_chg_spin=(0, 1), type_map=("H", "O"))
    states = [{}, {"charge": -1, "spin": 2}, {"charge": 1, "spin": 2}]
    structures = []
    for info in states:
        atoms = molecule("H2O")
        atoms.info.update(info)
        structures.append(atoms)
    expected = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        expected.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert len({round(e, 9) for e, _ in expected}) == 3
    for forces, (_, f) in zip(forces_of_many(calc, structures, batch_size=3), expected, strict=True):
        np.testing.assert_allclose(forces, f, atol=1e-10)
    relaxed = relax(calc, structures, max_steps=0, cell_filter=False, progress=False)
    for atoms, (e, f) in zip(relaxed, expected, strict=True):
        assert atoms.get_potential_energy() == pytest.approx(e, abs=1e-10)
    no_default = make_calc(add_chg_spin_ebd=True, type_map=("H", "O"))
    with pytest.raises(ValueError, match=r"evaluated frames: water None None: the model embeds the total charge"):
        evaluate(no_default, [water(0, 1), water()], progress=False)
