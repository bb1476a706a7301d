"""Bad input gets a clear message: configs, data files, the calculator, logging, and graphs at the edges.

Configs and data name the key, or the file and frame; bad frames are rejected or skipped (with one warning
and a count) as ``data.on_bad_frame`` says; the calculator warns once about atoms closer than
``min_pair_dist``; odd cells (skewed, one atom, vacuum) give the same energy per atom as their supercells.
"""

import json
import logging
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import bulk, fcc111, make_supercell

from conftest import ROOT, triclinic_cell
from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.config import ConfigError, load_config
from dpa4_jax.data import Frame, FrameError, make_emt_dataset, read_frames, write_extxyz
from dpa4_jax.data.frame import UnreadableError

# ----------------------------------------------------------------------------- configs

VALID = {"model": {"type_map": ["Cu"], "rcut": 3.0, "channels": 8}, "data": {"train": "train.xyz"}}


@pytest.mark.parametrize("section, key, value, message", [
    ("data", "min_pair_distance", 0.1, r"unknown key\(s\) data\.min_pair_distance"),
    ("training", "steps", "ten", r"training\.steps: expected an integer"),
    ("data", "on_bad_frame", "ignore", r"data\.on_bad_frame: 'error' or 'skip'"),
    ("model", "channels", 0, r"model\.channels: must be positive"),
    ("model", "sel", -1, r"model\.sel: must be positive"),
    ("model", "env_exp", [7, 0], r"model\.env_exp: must be positive"),
    ("model", "n_atten_head", -2, r"model\.n_atten_head: must be non-negative"),
    ("data", "min_pair_dist", 0.0, r"data\.min_pair_dist: must be positive"),
    ("data", "max_frames", 0, r"data\.max_frames: must be positive"),
    ("training", "batch_atoms", -5, r"training\.batch_atoms: must be positive"),
    ("training", "grad_clip", -1.0, r"training\.grad_clip: must be non-negative"),
    ("optimizer", "lr", 0.0, r"optimizer\.lr: must be positive"),
    ("optimizer", "warmup_steps", -1, r"optimizer\.warmup_steps: must be non-negative"),
    ("optimizer", "adam_betas", [0.9, 1.0], r"optimizer\.adam_betas\[1\]: must be below 1"),
    ("loss", "forces", -1.0, r"loss\.forces: must be non-negative"),
    ("data", "validation", "missing.xyz", r"data\.validation: missing\.xyz does not exist"),
])
def test_config_mistakes_name_file_and_key(tmp_path, section, key, value, message):
    (tmp_path / "train.xyz").write_text("")
    body = {name: dict(entries) for name, entries in VALID.items()}
    body.setdefault(section, {})[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=rf"run\.yaml: {message}"):
        load_config(path)


def test_valid_config_loads_with_the_new_data_keys(tmp_path):
    (tmp_path / "train.xyz").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(VALID))
    data = load_config(path).data
    assert data.min_pair_dist == 0.1 and data.on_bad_frame == "error"


# ----------------------------------------------------------------------------- data files


def _water(shift=0.0):
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.positions += shift
    atoms.info["REF_energy"] = -14.2 + shift
    atoms.arrays["REF_forces"] = np.full((3, 3), 0.1)
    return atoms


def _periodic(stress):
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.info.update(REF_energy=-3.5, REF_stress=np.asarray(stress, float))
    atoms.arrays["REF_forces"] = np.zeros((1, 3))
    return atoms


def _with(atoms, **changes):
    for key, value in changes.items():
        if key == "positions":
            atoms.positions = value
        elif key in atoms.arrays:
            atoms.arrays[key] = value
        else:
            atoms.info[key] = value
    return atoms


# each: the bad frame and the words its error must hold
BAD_FRAMES = {
    "nan energy": (lambda: _with(_water(), REF_energy=float("nan")), "energy is nan"),
    "inf forces": (lambda: _with(_water(), REF_forces=np.array([[0, 0, 0], [np.inf, 0, 0], [0, 0, 0]])),
                   r"forces contain NaN/inf \(atom 1\)"),
    "nan stress": (lambda: _periodic([0.01, 0, np.nan, 0, 0, 0]), "virial contains NaN/inf"),
    "nan positions": (lambda: _with(_water(), positions=[[0, 0, 0], [0.96, 0, 0], [np.nan, 0.93, 0]]),
                      r"positions contain NaN/inf \(atom 2\)"),
    "no atoms": (lambda: _with(Atoms(), REF_energy=0.0), "frame has no atoms"),
    "close atoms": (lambda: _with(_water(), positions=[[0, 0, 0], [0.96, 0, 0], [0.96, 0.05, 0]]),
                    r"atoms 1 and 2 are 0\.05 Å apart \(1 pair\(s\) closer than min_pair_dist 0\.1 Å\)"),
    "stress shape": (lambda: _periodic([0.01, 0.0, 0.0, 0.0]), "REF_stress has 4 components, expected 6 or 9"),
    "energy shape": (lambda: _with(_water(), REF_energy=np.array([1.0, 2.0])), "energy must be a scalar"),
}
KEYS = dict(energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")


@pytest.mark.parametrize("kind", BAD_FRAMES)
def test_bad_extxyz_frame_is_named_or_skipped(tmp_path, caplog, kind):
    build, reason = BAD_FRAMES[kind]
    path = tmp_path / "data.xyz"
    ase.io.write(path, [_water(), build(), _water(shift=5.0)], format="extxyz")
    with pytest.raises(FrameError, match=rf"data\.xyz:1: .*{reason}"):
        list(read_frames(path, **KEYS))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        frames = list(read_frames(path, on_bad_frame="skip", **KEYS))
    assert [f.source for f in frames] == [f"{path}:0", f"{path}:2"]  # the frames after a bad one are kept
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 1 bad frame(s)" in warning and f"{path}:1" in warning


def test_min_pair_dist_is_configurable_and_sees_periodic_images(tmp_path):
    """A pair 0.3 Å apart across the cell boundary: bad at min_pair_dist 0.5, good at 0.1 and without pbc."""
    atoms = Atoms("Cu2", positions=[[0.1, 1, 1], [3.8, 1, 1]], cell=[4.0, 4.0, 4.0], pbc=True)
    path = _write(tmp_path / "pair.xyz", atoms)
    assert len(list(read_frames(path))) == 1
    with pytest.raises(FrameError, match=r"pair\.xyz:0: atoms 0 and 1 are 0\.3 Å apart"):
        list(read_frames(path, min_pair_dist=0.5))
    atoms.pbc = False
    assert len(list(read_frames(_write(tmp_path / "open.xyz", atoms), min_pair_dist=0.5))) == 1


def _write(path, atoms):
    ase.io.write(path, atoms, format="extxyz")
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_extxyz_names_file_and_frame(tmp_path, caplog, damage):
    path = tmp_path / "damaged.xyz"
    ase.io.write(path, [_water(shift=5.0 * k) for k in range(4)], format="extxyz")
    lines = path.read_text().splitlines(keepends=True)
    if damage == "truncated":  # a write cut off inside frame 2 (5 lines per frame)
        path.write_text("".join(lines[:12]))
    else:
        lines[12] = lines[12].replace(lines[12].split()[1], "1.0x0", 1)  # frame 2's first x coordinate
        path.write_text("".join(lines))
    with pytest.raises(UnreadableError, match=r"damaged\.xyz: cannot parse extxyz near frame 2"):
        list(read_frames(path, **KEYS))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        frames = list(read_frames(path, on_bad_frame="skip", **KEYS))
    assert len(frames) == 2
    assert "skipped 0 bad frame(s) and 1 unreadable rest(s) of a file" in caplog.text



def _deepmd_system(root, n_sets=2, nf=3):
    """A periodic Cu4 system with energies, forces and virials; ``set.00k`` frames are rattled copies."""
    (root).mkdir()
    (root / "type_map.raw").write_text("Cu\n")
    (root / "type.raw").write_text("0\n0\n0\n0\n")
    base = bulk("Cu", "fcc", a=3.6, cubic=True)
    rng = np.random.default_rng(0)
    for k in range(n_sets):
        sd = root / f"set.{k:03d}"
        sd.mkdir()
        coord = base.positions[None] + rng.normal(0, 0.05, (nf, 4, 3))
        np.save(sd / "coord.npy", coord.reshape(nf, 12))
        np.save(sd / "box.npy", np.tile(base.cell.array.reshape(1, 9), (nf, 1)))
        np.save(sd / "energy.npy", rng.normal(size=nf))
        np.save(sd / "force.npy", rng.normal(size=(nf, 12)))
        np.save(sd / "virial.npy", rng.normal(size=(nf, 9)))
    return root


def test_bad_deepmd_frames_and_sets(tmp_path, caplog):
    system = _deepmd_system(tmp_path / "cu")
    energy = np.load(system / "set.000" / "energy.npy")
    energy[1] = np.inf
    np.save(system / "set.000" / "energy.npy", energy)
    coord = np.load(system / "set.000" / "coord.npy")
    coord[2, 3:6] = coord[2, 0:3] + [0.02, 0.0, 0.0]  # atom 1 on top of atom 0
    np.save(system / "set.000" / "coord.npy", coord)
    with pytest.raises(FrameError, match=r"cu/set\.000:1: energy is inf"):
        list(read_frames(system))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        frames = list(read_frames(system, on_bad_frame="skip"))
    assert [f.source.split("/")[-1] for f in frames] == ["set.000:0", "set.001:0", "set.001:1", "set.001:2"]
    assert "skipped 2 bad frame(s)" in caplog.text and "set.000:2: atoms 0 and 1 are 0.02 Å apart" in caplog.text


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"cu/set\.000/force\.npy: cannot load"),
    ("wrong shape", r"cu/set\.000/force\.npy: 11 values per frame, expected 12"),
])
def test_damaged_deepmd_set_is_named_and_skipped_whole(tmp_path, caplog, damage, message):
    system = _deepmd_system(tmp_path / "cu")
    force = system / "set.000" / "force.npy"
    if damage == "truncated":
        force.write_bytes(force.read_bytes()[:-40])
    else:
        np.save(force, np.zeros((3, 11)))
    with pytest.raises(UnreadableError, match=message):
        list(read_frames(system))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        frames = list(read_frames(system, on_bad_frame="skip"))
    assert len(frames) == 3 and all("set.001" in f.source for f in frames)
    assert "1 unreadable rest(s) of a file" in caplog.text


def _mptrj_record(positions, forces=None, energy=-7.0):
    sites = [{"species": [{"element": "Cu", "occu": 1}], "xyz": list(map(float, x))} for x in positions]
    return {"structure": {"lattice": {"matrix": (3.6 * np.eye(3)).tolist()}, "sites": sites},
            "uncorrected_total_energy": energy,
            "force": forces if forces is not None else [[0.0, 0.0, 0.0]] * len(positions)}


def test_bad_and_truncated_mptrj(tmp_path, caplog):
    good = [[0, 0, 0], [1.8, 1.8, 0]]
    data = {"mp-1": {"mp-1-0": _mptrj_record(good), "mp-1-1": _mptrj_record(good, forces=[[0.0, 0.0]] * 2),
                     "mp-1-2": _mptrj_record([])},
            "mp-2": {"mp-2-0": _mptrj_record(good), "mp-2-1": _mptrj_record(good)}}
    path = tmp_path / "mptrj.json"
    text = json.dumps(data)
    path.write_text(text)
    with pytest.raises(FrameError, match=r"mptrj\.json:mp-1/mp-1-1: forces have shape \(2, 2\)"):
        list(read_frames(path))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        frames = list(read_frames(path, on_bad_frame="skip"))
    assert [f.source.split(":")[-1] for f in frames] == ["mp-1/mp-1-0", "mp-2/mp-2-0", "mp-2/mp-2-1"]
    assert "skipped 2 bad frame(s)" in caplog.text and "mp-1/mp-1-2: structure has no sites" in caplog.text



def test_truncated_mptrj_names_the_last_frame_read(tmp_path, caplog):
    good = [[0, 0, 0], [1.8, 1.8, 0]]
    data = {"mp-1": {"mp-1-0": _mptrj_record(good)}, "mp-2": {"mp-2-0": _mptrj_record(good),
                                                            "mp-2-1": _mptrj_record(good)}}
    path = tmp_path / "mptrj.json"
    text = json.dumps(data)
    path.write_text(text[:text.index('"mp-2-1"') + 20])  # a download cut off inside the last frame
    with pytest.raises(UnreadableError, match=r"mptrj\.json: invalid JSON after .*mptrj\.json:mp-1/mp-1-0"):
        list(read_frames(path))
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        assert len(list(read_frames(path, on_bad_frame="skip"))) == 1  # ijson reads a material whole
    assert "1 unreadable rest(s) of a file" in caplog.text


# ----------------------------------------------------------------------------- inference


def _fresh(calc, **kwargs):
    """A calculator with ``calc``'s model and its own warning state."""
    return DPA4Calculator(calc.config, calc.variables, dtype=calc.dtype, **kwargs)


def test_calculator_warns_once_per_set_of_close_pairs(tiny_calc, caplog):
    calc = _fresh(tiny_calc)
    atoms = Atoms("COH", positions=[[0, 0, 0], [0, 0, 0.001], [1.5, 0, 0]])
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        calc.graph(atoms)
        atoms.positions[1, 2] = 0.002  # an MD step later: the same pair, no second warning
        calc.graph(atoms)
    (first,) = [r.getMessage() for r in caplog.records]
    assert "atoms 0 and 1 are 0.001 Å apart" in first and "min_pair_dist 0.1 Å" in first
    caplog.clear()
    atoms.positions[2] = [0.05, 0.002, 0.0]  # now three close pairs: a new set, a new warning
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        calc.graph(atoms)
    (second,) = [r.getMessage() for r in caplog.records]
    assert "3 pair(s)" in second
    # through the periodic images of a small cell, and silent for a healthy structure
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpa4_jax"):
        _fresh(tiny_calc, min_pair_dist=0.5).graph(Atoms("Cu2", positions=[[0.1, 1, 1], [3.7, 1, 1]],
                                                         cell=[4.0, 4.0, 4.0], pbc=True))
        _fresh(tiny_calc).graph(bulk("Cu", "fcc", a=3.6))
    (image,) = [r.getMessage() for r in caplog.records]
    assert "atoms 0 and 1 are 0.4 Å apart" in image


def test_calculator_keeps_clear_errors(tiny_calc):
    iron = Atoms("CuFe", positions=[[0, 0, 0], [0, 0, 2.0]])
    iron.calc = tiny_calc
    with pytest.raises(ValueError, match=r"element\(s\) Fe not in the model's type map"):
        iron.get_potential_energy()
    broken = Atoms("CuO", positions=[[0, 0, 0], [np.nan, 0, 2.0]])
    broken.calc = tiny_calc
    with pytest.raises(graphs.GraphError, match=r"non-finite \(NaN or inf\) positions for atom\(s\) \[1\]"):
        broken.get_potential_energy()


def test_close_pairs_reuses_a_neighbour_list():
    """From a cutoff-4 neighbour list or from its own search: the same pairs and distances."""
    atoms = triclinic_cell()
    atoms.positions[1] = atoms.positions[0] + [0.03, 0.04, 0.0]
    edges = graphs.neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
    reused = graphs.close_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 0.1, edges=edges)
    searched = graphs.close_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 0.1)
    np.testing.assert_array_equal(reused[0], [[0, 1]])
    np.testing.assert_allclose(reused[1], [0.05], rtol=1e-12)
    np.testing.assert_array_equal(reused[0], searched[0])
    np.testing.assert_allclose(reused[1], searched[1], rtol=1e-12)


# ----------------------------------------------------------------------------- graphs


def _cells_and_supercells():
    """(name, cell, supercell): a strongly skewed description of a triclinic crystal, a strained 1-atom cell,
    and a vacuum slab (open along z, and periodic with 10 Å of vacuum: more than the cutoff)."""
    skewed = make_supercell(triclinic_cell(seed=1), [[1, 1, 0], [0, 1, 1], [1, 1, 1]])  # det 1: same crystal
    one = bulk("Cu", "fcc", a=3.6)
    one.set_cell(one.cell.array @ [[1.02, 0.03, 0], [0.03, 0.97, 0.01], [0, 0.01, 1.0]], scale_atoms=True)
    slab = fcc111("Cu", size=(1, 1, 3), vacuum=5.0, a=3.7)
    slab.numbers[1] = 79
    slab.rattle(0.05, seed=2)
    slab.pbc = (True, True, False)
    boxed = slab.copy()
    boxed.pbc = True
    return [("skewed triclinic", skewed, make_supercell(skewed, [[2, 1, 0], [0, 1, 0], [0, 0, 1]])),
            ("1-atom cell", one, make_supercell(one, [[-1, 1, 1], [1, -1, 1], [1, 1, -1]])),
            ("vacuum slab", slab, make_supercell(slab, [[2, 1, 0], [0, 1, 0], [0, 0, 1]])),
            ("periodic vacuum slab", boxed, make_supercell(boxed, [[1, 0, 0], [0, 1, 0], [0, 0, 2]]))]


def test_odd_cells_equal_their_supercells_per_atom(tiny_calc):
    cases = _cells_and_supercells()
    structures = [a for _, cell, supercell in cases for a in (cell, supercell)]
    rcut = tiny_calc.config.rcut
    # the most edges first, so the padded shape is compiled once for all of them
    for atoms in sorted(structures, key=lambda a: -len(graphs.neighbor_list(a.positions, a.cell, a.pbc, rcut)[0])):
        atoms.calc = tiny_calc
        atoms.get_potential_energy()
    for name, cell, supercell in cases:
        n = len(supercell) // len(cell)
        np.testing.assert_allclose(supercell.get_potential_energy() / len(supercell),
                                   cell.get_potential_energy() / len(cell), rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(np.sort(supercell.get_potential_energies()),
                                   np.sort(np.tile(cell.get_potential_energies(), n)), rtol=1e-10, err_msg=name)
        if cell.pbc.all():
            np.testing.assert_allclose(supercell.get_stress(), cell.get_stress(), atol=1e-10, err_msg=name)
    slab, boxed = cases[2][1], cases[3][1]  # vacuum wider than the cutoff is no interaction
    np.testing.assert_allclose(boxed.get_potential_energy(), slab.get_potential_energy(), rtol=1e-12)


def test_a_batch_over_every_budget_gets_one_that_holds_all_its_edges():
    from dpa4_jax.train.data import Batcher, BatchSize

    frames = make_emt_dataset(6, seed=3)
    batch = graphs.batch([graphs.structure_graph(np.zeros(f.natoms, int), f.positions, f.cell, f.pbc, 4.0)
                          for f in frames])
    size = BatchSize(int(batch.n_node.sum()), int(batch.n_edge.sum()), len(frames))
    small = graphs.Budget(n_node=16, n_edge=256, n_graph=3)
    with pytest.raises(graphs.GraphError, match="does not fit"):  # padding never drops edges silently
        graphs.pad(batch, small)
    batcher = Batcher(np.array([f.natoms for f in frames]), batch.n_edge, [small])
    budget = batcher.budget_for(size)
    padded = graphs.pad(batch, budget)
    n_edge = size.n_edge
    np.testing.assert_array_equal(padded.senders[:n_edge], batch.senders)
    np.testing.assert_array_equal(padded.receivers[:n_edge], batch.receivers)
    np.testing.assert_array_equal(padded.n_edge[:len(frames)], batch.n_edge)
    assert batcher.budget_for(size) == budget and len(batcher.budgets) == 2  # grown once, then reused


# ----------------------------------------------------------------------------- logging


def test_logging_shows_the_project_at_info_and_jax_at_warning():
    """JAX logs "Unable to initialize backend 'tpu'" at INFO when it looks for backends; it must not show."""
    script = ("import logging, jax\n"
              "from dpa4_jax.logs import setup_logging\n"
              "setup_logging()\n"
              "jax.devices()\n"
              "logging.getLogger('dpa4_jax.train').info('project info line')\n"
              "logging.getLogger('jax._src.xla_bridge').warning('jax warning line')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}  # let JAX look
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "project info line" in out.stderr and "jax warning line" in out.stderr
    assert "INFO jax" not in out.stderr and "Unable to initialize backend" not in out.stderr, out.stderr


# ----------------------------------------------------------------------------- training


def test_unknown_element_in_the_data_stops_training_before_any_compilation(tmp_path):
    """Frame 3 holds Fe, which the model's type map lacks: the error names it before JAX compiles anything."""
    from jax import monitoring

    from dpa4_jax.config import Config, DataConfig, ModelConfig, TrainingConfig
    from dpa4_jax.train.loop import fit

    frames = make_emt_dataset(6, seed=1)
    f = frames[3]
    frames[3] = Frame(np.r_[26, f.numbers[1:]], f.positions, f.cell, f.pbc, f.energy, f.forces, f.virial)
    path = tmp_path / "emt.extxyz"
    write_extxyz(frames, path)
    model = ModelConfig(type_map=("Al", "Ni", "Cu", "Au"), rcut=3.1, channels=8, n_radial=4, lmax=1, mmax=1, n_blocks=1,
                        mixing_layers=1, sel=20)  # a model no other test compiles
    config = Config(model=model, data=DataConfig(train=str(path), val_fraction=0.2),
                    training=TrainingConfig(steps=2, batch_atoms=20))
    compiled = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiled.append(event) if event.endswith("backend_compile_duration") else None)
    with pytest.raises(FrameError, match=r"emt\.extxyz:3: element Fe \(Z=26\) is not in type_map"):
        fit(config, tmp_path / "run", yaml.safe_dump({"model": {}}), progress=False)
    assert compiled == []
