"""Tests of the host-side data layer (frames, readers, statistics, demo data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa

from dpa4_jax.data import (
    Frame,
    FrameError,
    fit_energy_bias,
    make_emt_dataset,
    read_deepmd,
    read_extxyz,
    read_frames,
    read_mptrj,
    split_frames,
    write_extxyz,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPA4_SHARED_DATA", REPO_ROOT / ".." / "shared" / "data"))


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------- Frame


def test_frame_validation_and_conversion():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    stress6 = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])
    fr = Frame.from_atoms(atoms, energy=-1.5, forces=np.zeros((4, 3)), stress=stress6, source="x:0")
    vol = atoms.get_volume()
    s = fr.stress
    assert s.shape == (3, 3) and np.allclose(s, s.T)
    np.testing.assert_allclose(fr.virial, -vol * s)
    np.testing.assert_allclose(full_3x3_to_voigt_6_stress(s), stress6)
    assert fr.numbers.dtype == np.int64 and fr.positions.dtype == np.float64 and fr.pbc.dtype == bool
    assert not fr.positions.flags.writeable
    back = fr.to_atoms()
    np.testing.assert_allclose(back.get_stress(), stress6)
    assert back.get_potential_energy() == -1.5

    # non-periodic: cell forced to zeros
    mol = molecule("H2O")
    mol.cell = [10, 10, 10]
    f2 = Frame.from_atoms(mol, energy=0.0)
    assert not f2.pbc.any() and (f2.cell == 0).all() and f2.virial is None


def test_frame_errors_name_source():
    pos = np.zeros((2, 3))
    pos[1, 0] = np.nan
    with pytest.raises(FrameError, match=r"a\.xyz:7: positions contain NaN/inf \(atom 1\)"):
        Frame([1, 1], pos, np.eye(3) * 5, [True] * 3, source="a.xyz:7")
    with pytest.raises(FrameError, match=r"a\.xyz:3: positions have shape"):
        Frame([1, 1, 8], np.zeros((2, 3)), np.eye(3), [True] * 3, source="a.xyz:3")
    with pytest.raises(FrameError, match=r"s:1: forces have shape"):
        Frame([1, 1], np.zeros((2, 3)), np.eye(3), [True] * 3, forces=np.zeros((3, 3)), source="s:1")
    with pytest.raises(FrameError, match=r"s:2: cell is singular"):
        Frame([1], np.zeros((1, 3)), np.diag([1.0, 1.0, 0.0]), [True, True, False], source="s:2")
    with pytest.raises(FrameError, match="non-periodic"):
        Frame([1], np.zeros((1, 3)), np.zeros((3, 3)), [False] * 3, virial=np.eye(3), source="s:3")


# ----------------------------------------------------------------- extxyz


def _labelled_atoms(seed):
    rng = _rng(seed)
    a = bulk("Al", "fcc", a=4.05, cubic=True).repeat((1, 1, 2))
    a.positions += rng.normal(0, 0.05, a.positions.shape)
    e = float(rng.normal())
    f = rng.normal(size=(len(a), 3))
    s6 = rng.normal(size=6) * 0.01
    return a, e, f, s6


def test_read_extxyz_custom_keys(tmp_path):
    path = tmp_path / "ref.extxyz"
    images, expected = [], []
    for k in range(3):
        a, e, f, s6 = _labelled_atoms(k)
        a.info["REF_energy"] = e
        a.arrays["REF_forces"] = f
        # frame 0: Voigt-6 stress; frame 1: 3x3 stress; frame 2: no stress
        if k == 0:
            a.info["REF_stress"] = s6
        elif k == 1:
            s3 = np.array([[s6[0], s6[5], s6[4]], [s6[5], s6[1], s6[3]], [s6[4], s6[3], s6[2]]])
            a.info["REF_stress"] = s3.reshape(-1)
        images.append(a)
        expected.append((a.copy(), e, f, s6 if k < 2 else None))
    m = molecule("CH4")  # non-periodic, energy only, no forces
    m.info["REF_energy"] = -3.0
    images.append(m)
    ase.io.write(path, images, format="extxyz")

    frames = list(read_extxyz(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress"))
    assert len(frames) == 4
    for fr, (a, e, f, s6) in zip(frames, expected):
        np.testing.assert_allclose(fr.positions, a.positions, atol=1e-7)
        np.testing.assert_allclose(fr.energy, e, rtol=1e-12)
        np.testing.assert_allclose(fr.forces, f, atol=1e-7)
        if s6 is None:
            assert fr.virial is None
        else:
            s3 = Frame.from_atoms(a, stress=s6).stress
            np.testing.assert_allclose(fr.virial, -a.get_volume() * s3, rtol=1e-10, atol=1e-12)
    assert frames[3].energy == -3.0 and frames[3].forces is None and not frames[3].pbc.any()
    assert frames[2].source == f"{path}:2"
    # default keys: those labels do not exist -> None, not an error
    plain = list(read_extxyz(path))
    assert all(fr.energy is None and fr.forces is None and fr.virial is None for fr in plain)
    # index selection keeps file indices in sources
    sel = list(read_extxyz(path, energy_key="REF_energy", index="1:3"))
    assert [fr.source for fr in sel] == [f"{path}:1", f"{path}:2"]


def test_read_extxyz_singlepoint_calculator(tmp_path):
    a, e, f, s6 = _labelled_atoms(5)
    a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s6)
    path = tmp_path / "calc.xyz"
    ase.io.write(path, a, format="extxyz")
    (fr,) = read_frames(path)
    assert fr.energy == pytest.approx(e, rel=1e-12)
    np.testing.assert_allclose(fr.forces, f, atol=1e-7)
    np.testing.assert_allclose(full_3x3_to_voigt_6_stress(fr.stress), s6, atol=1e-10)


def test_read_extxyz_nan_names_frame(tmp_path):
    path = tmp_path / "bad.xyz"
    path.write_text(
        "1\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0.0 0.0 0.0\n"
        "2\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0.0 0.0 0.0\nH nan 0.0 0.7\n"
    )
    frames = read_extxyz(path)
    next(frames)
    with pytest.raises(FrameError, match=r"bad\.xyz:1: positions contain NaN"):
        next(frames)


# ----------------------------------------------------------------- DeePMD


def _write_deepmd_system(d: Path, type_map, types, sets, nopbc=False):
    d.mkdir(parents=True)
    (d / "type_map.raw").write_text("\n".join(type_map) + "\n")
    (d / "type.raw").write_text("\n".join(map(str, types)) + "\n")
    if nopbc:
        (d / "nopbc").write_text("")
    for k, arrays in enumerate(sets):
        sd = d / f"set.{k:03d}"
        sd.mkdir()
        for name, a in arrays.items():
            np.save(sd / f"{name}.npy", a)


def _deepmd_arrays(rng, nf, nat, with_box=True, with_virial=True):
    out = {
        "coord": rng.uniform(0, 5, size=(nf, nat * 3)).astype(np.float32),
        "energy": rng.normal(size=nf),
        "force": rng.normal(size=(nf, nat * 3)),
    }
    if with_box:
        box = np.tile((np.eye(3) * 6.0).reshape(1, 9), (nf, 1))
        box[:, 1] = 0.5  # a triclinic component: rows are lattice vectors
        out["box"] = box
    if with_virial:
        out["virial"] = rng.normal(size=(nf, 9))
    return out


def test_read_deepmd_sets_virial_and_nopbc(tmp_path):
    rng = _rng(1)
    s0, s1 = _deepmd_arrays(rng, 3, 4), _deepmd_arrays(rng, 2, 4)
    _write_deepmd_system(tmp_path / "tree" / "bulk", ["O", "H"], [0, 1, 1, 0], [s0, s1])
    m0 = _deepmd_arrays(rng, 5, 3, with_box=False, with_virial=False)
    _write_deepmd_system(tmp_path / "tree" / "mol", ["C", "H", "O"], [2, 1, 1], [m0], nopbc=True)

    frames = list(read_deepmd(tmp_path / "tree" / "bulk"))
    assert len(frames) == 5
    fr = frames[4]  # set.001 frame 1
    assert fr.source.endswith("bulk/set.001:1")
    assert fr.numbers.tolist() == [8, 1, 1, 8]
    np.testing.assert_array_equal(fr.positions, s1["coord"][1].astype(np.float64).reshape(4, 3))
    np.testing.assert_array_equal(fr.cell, s1["box"][1].reshape(3, 3))
    assert fr.cell[0, 1] == 0.5
    np.testing.assert_array_equal(fr.forces, s1["force"][1].reshape(4, 3))
    np.testing.assert_array_equal(fr.virial, s1["virial"][1].reshape(3, 3))
    assert fr.energy == s1["energy"][1]
    assert fr.pbc.all()

    mols = list(read_deepmd(tmp_path / "tree" / "mol"))
    assert len(mols) == 5 and all(not f.pbc.any() and (f.cell == 0).all() for f in mols)
    assert mols[0].numbers.tolist() == [8, 1, 1] and mols[0].virial is None

    # whole tree through the dispatcher, systems in sorted order
    all_frames = list(read_frames(tmp_path / "tree"))
    assert len(all_frames) == 10 and "bulk" in all_frames[0].source and "mol" in all_frames[-1].source


def test_read_deepmd_nan_names_file_and_frame(tmp_path):
    rng = _rng(2)
    s0 = _deepmd_arrays(rng, 4, 2)
    s0["coord"][2, 4] = np.nan
    _write_deepmd_system(tmp_path / "sys", ["H"], [0, 0], [s0])
    with pytest.raises(FrameError, match=r"sys/set\.000:2: positions contain NaN/inf \(atom 1\)"):
        list(read_deepmd(tmp_path / "sys"))


def test_read_deepmd_shape_mismatch(tmp_path):
    rng = _rng(3)
    s0 = _deepmd_arrays(rng, 4, 2)
    s0["energy"] = s0["energy"][:3]
    _write_deepmd_system(tmp_path / "sys", ["H"], [0, 0], [s0])
    with pytest.raises(ValueError, match=r"energy\.npy: 3 frames"):
        list(read_deepmd(tmp_path / "sys"))


# ----------------------------------------------------------------- MPtrj


def _pmg_structure(cell, symbols, frac, use_xyz):
    cell = np.asarray(cell, dtype=float)
    sites = []
    for sym, abc in zip(symbols, frac):
        site = {"species": [{"element": sym, "occu": 1}], "abc": list(abc), "label": sym, "properties": {}}
        if use_xyz:
            site["xyz"] = list(np.asarray(abc) @ cell)
        sites.append(site)
    return {
        "@module": "pymatgen.core.structure",
        "@class": "Structure",
        "charge": 0,
        "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True]},
        "properties": {},
        "sites": sites,
    }


def test_read_mptrj_units_and_sign(tmp_path):
    cell_a = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 5.0]]
    cell_b = [[3.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 3.0]]
    kbar = 10.0 * np.eye(3)  # compressive (VASP sign positive)
    data = {
        "mp-1": {
            "mp-1-0-0": {
                "structure": _pmg_structure(cell_a, ["Li", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]], use_xyz=True),
                "uncorrected_total_energy": -10.0,
                "corrected_total_energy": -11.0,
                "energy_per_atom": -5.5,
                "force": [[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]],
                "stress": kbar.tolist(),
                "magmom": None,
            },
            "mp-1-1-0": {
                "structure": _pmg_structure(cell_a, ["Li", "O"], [[0, 0, 0], [0.5, 0.4, 0.5]], use_xyz=True),
                "uncorrected_total_energy": -9.5,
                "corrected_total_energy": -10.5,
                "energy_per_atom": -5.25,
                "force": [[0.2, 0.0, 0.0], [-0.2, 0.0, 0.0]],
                "stress": (-kbar).tolist(),
            },
        },
        "mp-2": {
            "mp-2-0-0": {
                "structure": _pmg_structure(cell_b, ["Fe", "Fe", "O"], [[0, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.5]], use_xyz=False),
                "uncorrected_total_energy": -20.0,
                "corrected_total_energy": -21.0,
                "energy_per_atom": -7.0,
                "force": [[0.0, 0.0, 0.0]] * 3,
                "stress": [[1.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 4.0]],
            }
        },
    }
    path = tmp_path / "MPtrj_mini.json"
    path.write_text(json.dumps(data))

    frames = list(read_mptrj(path))
    assert [f.source.split(":")[-1] for f in frames] == ["mp-1/mp-1-0-0", "mp-1/mp-1-1-0", "mp-2/mp-2-0-0"]
    f0, f1, f2 = frames
    assert f0.numbers.tolist() == [3, 8] and f0.energy == -10.0
    np.testing.assert_allclose(f0.positions[1], [2.0, 2.0, 2.5])
    # compressive +10 kBar = 1 GPa -> ASE stress -1 GPa (negative), virial = +V * 1 GPa
    np.testing.assert_allclose(f0.stress, -1.0 * GPa * np.eye(3), rtol=1e-12)
    assert f0.stress[0, 0] < 0
    np.testing.assert_allclose(f0.virial, 80.0 * GPa * np.eye(3), rtol=1e-12)
    assert f1.stress[0, 0] > 0  # tensile
    # fractional-only sites
    np.testing.assert_allclose(f2.positions[1], [2.0, 1.5, 0.0])
    np.testing.assert_allclose(f2.positions[2], [1.0, 0.75, 1.5])
    np.testing.assert_allclose(f2.stress, -0.1 * GPa * np.array(data["mp-2"]["mp-2-0-0"]["stress"]))
    # energy keys
    assert [f.energy for f in read_mptrj(path, energy_key="corrected_total_energy")] == [-11.0, -10.5, -21.0]
    assert [f.energy for f in read_mptrj(path, energy_key="energy_per_atom")] == [-11.0, -10.5, -21.0]
    assert len(list(read_frames(path))) == 3
    with pytest.raises(ValueError, match="energy_key"):
        read_mptrj(path, energy_key="energy")


# ----------------------------------------------------------------- dispatch, split, errors


def test_read_frames_errors(tmp_path):
    missing = tmp_path / "nope.xyz"
    with pytest.raises(FileNotFoundError, match="nope.xyz"):
        read_frames(missing)
    with pytest.raises(FileNotFoundError, match="nope.xyz"):
        read_extxyz(missing)  # eager, not at first next()
    odd = tmp_path / "data.cif"
    odd.write_text("")
    with pytest.raises(ValueError, match=r"data\.cif: unknown data format"):
        read_frames(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DeePMD system"):
        read_frames(tmp_path / "empty")


def test_split_frames_deterministic():
    frames = make_emt_dataset(10, seed=3)
    tr, va = split_frames(frames, 0.2, seed=7)
    tr2, va2 = split_frames(frames, 0.2, seed=7)
    assert len(va) == 2 and len(tr) == 8
    assert [f.source for f in va] == [f.source for f in va2] and [f.source for f in tr] == [f.source for f in tr2]
    assert {f.source for f in tr}.isdisjoint(f.source for f in va)
    assert split_frames(frames[:3], 0.01, seed=0)[1].__len__() == 1
    with pytest.raises(ValueError):
        split_frames(frames, 1.0, seed=0)


# ----------------------------------------------------------------- demo data


def test_demo_dataset_and_extxyz_round_trip(tmp_path):
    frames = make_emt_dataset(24, seed=11)
    again = make_emt_dataset(24, seed=11)
    assert len(frames) == 24
    assert all(np.array_equal(a.positions, b.positions) and a.energy == b.energy for a, b in zip(frames, again))
    sizes = {f.natoms for f in frames}
    assert min(sizes) >= 4 and max(sizes) <= 32 and len(sizes) >= 3
    assert set(np.concatenate([f.numbers for f in frames]).tolist()) <= {13, 28, 29, 79}
    assert any(len(set(f.numbers.tolist())) == 2 for f in frames)  # some alloys
    assert all(f.energy is not None and f.forces is not None and f.virial is not None for f in frames)

    path = tmp_path / "demo.extxyz"
    write_extxyz(frames, path)
    back = list(read_extxyz(path))
    assert len(back) == len(frames)
    for a, b in zip(frames, back):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell, b.cell)
        np.testing.assert_array_equal(a.pbc, b.pbc)
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_allclose(a.virial, b.virial, rtol=1e-13, atol=1e-13)
    # custom keys round trip too
    write_extxyz(frames[:2], tmp_path / "ref.xyz", energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    ref = list(read_extxyz(tmp_path / "ref.xyz", energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress"))
    assert ref[1].energy == frames[1].energy
    np.testing.assert_allclose(ref[1].virial, frames[1].virial, rtol=1e-13, atol=1e-13)


def test_demo_virial_sign_matches_strain_derivative():
    """virial = -dE/d(eps): check the convention with EMT by finite differences."""
    from ase.calculators.emt import EMT

    fr = make_emt_dataset(1, seed=5)[0]
    atoms = fr.to_atoms()
    atoms.calc = EMT()
    h = 1e-5
    for i, j in [(0, 0), (1, 2)]:
        e = []
        for sgn in (1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += 0.5 * sgn * h
            eps[j, i] += 0.5 * sgn * h
            a = atoms.copy()
            a.calc = EMT()
            a.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            e.append(a.get_potential_energy())
        np.testing.assert_allclose(fr.virial[i, j], -(e[0] - e[1]) / (2 * h), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- statistics


def test_fit_energy_bias_recovers_known_values():
    rng = _rng(4)
    type_map = ["H", "C", "N", "O"]  # N never appears
    e_ref = {1: -13.6, 6: -1030.0, 8: -2040.0}
    frames = []
    for k in range(40):
        n = rng.integers(3, 12)
        numbers = rng.choice([1, 6, 8], size=n)
        energy = sum(e_ref[z] for z in numbers) + rng.normal(0, 1e-3)
        frames.append(Frame(numbers, rng.normal(size=(n, 3)) * 3, np.zeros((3, 3)), [False] * 3, energy=energy, source=f"syn:{k}"))
    frames.append(Frame([1, 1], np.zeros((2, 3)) + [[0, 0, 0], [0, 0, 0.7]], np.zeros((3, 3)), [False] * 3, source="noE:0"))
    bias = fit_energy_bias(frames, type_map)
    assert bias.shape == (4,)
    np.testing.assert_allclose(bias, [-13.6, -1030.0, 0.0, -2040.0], atol=2e-3)
    assert bias[2] == 0.0

    bad = Frame([1, 16], [[0, 0, 0], [0, 0, 1.3]], np.zeros((3, 3)), [False] * 3, energy=1.0, source="file.xyz:9")
    with pytest.raises(FrameError, match=r"file\.xyz:9: element S \(Z=16\) is not in type_map"):
        fit_energy_bias(frames + [bad], type_map)
    with pytest.raises(ValueError, match="no frame has an energy"):
        fit_energy_bias(frames[-1:], type_map)


# ----------------------------------------------------------------- real data (optional)


@pytest.mark.skipif(not (SHARED_DATA / "water").is_dir(), reason="shared water data not present")
def test_real_water():
    frames = list(read_frames(SHARED_DATA / "water"))
    assert len(frames) == 400
    assert {f.natoms for f in frames} == {192}
    f = frames[0]
    assert f.pbc.all() and f.virial is None and f.forces.shape == (192, 3)
    assert sorted(np.bincount(f.numbers)[[1, 8]].tolist()) == [64, 128]
    assert all(-156.0 < fr.energy / fr.natoms < -155.9 for fr in frames)


@pytest.mark.skipif(not (SHARED_DATA / "molecules-nopbc").is_dir(), reason="shared molecules data not present")
def test_real_molecules_nopbc():
    frames = list(read_frames(SHARED_DATA / "molecules-nopbc"))
    assert len(frames) == 2062
    assert all(not f.pbc.any() and (f.cell == 0).all() for f in frames)
    assert {f.natoms for f in frames} <= set(range(7, 11))
    bias = fit_energy_bias(frames, ["C", "H", "O"])
    assert np.all(np.isfinite(bias))
