"""Shared fixtures: float64 on, tiny models, structures, the training tests' run.

Tests need 64-bit JAX for finite differences and tight symmetry checks; float32
models still compute in float32 (their parameters and inputs are cast).
"""

import dataclasses
import os
from pathlib import Path

# Compilation is most of the suite's time, and the tests check values, not speed: XLA's LLVM backend at -O0
# compiles about a third faster (tests/test_physics.py: 236 s instead of 382 s; the values differ by round-off).
# The benchmarks run with the defaults users get. Set before JAX starts; subprocesses inherit it.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, fcc111, molecule  # noqa: E402

from dpa4_jax.calculator import DPA4Calculator  # noqa: E402
from dpa4_jax.config import Config, DataConfig, LossConfig, ModelConfig, OptimizerConfig, TrainingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPA4_SHARED_DATA", ROOT.parent / "shared" / "data"))

# A small model that still has every part of DPA4: two focus streams with rank-2
# edge-node products, attention, the Lebedev FFN, L = 2 with m-truncation.
TINY = dict(type_map=("H", "C", "O", "Si", "Cu", "Au"), channels=16, lmax=2, mmax=1, n_blocks=2, mixing_layers=2,
            n_radial=8, rcut=4.0, n_focus=2, radial_so2_rank=2)

# A model smaller than TINY (compilations are most of tests/test_relax.py's time), with the ZBL term, which
# reaches past rcut unless edges beyond it are masked.
SMALL_ZBL = dict(channels=8, lmax=1, mmax=1, n_blocks=1, mixing_layers=1, n_radial=4, n_focus=1, radial_so2_rank=1,
                 bridging="zbl")


def perturb_params(params, seed=0, scale=0.1):
    """Give every parameter a random perturbation (a fresh model's residual projections are zero,
    which would make it trivially invariant)."""
    return _perturb(params, jax.random.key(seed), scale)


@jax.jit
def _perturb(params, key, scale):  # one compilation instead of one eager random draw per shape
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def make_calc(seed=0, dtype="float64", **overrides):
    calc = DPA4Calculator.from_config(ModelConfig(**{**TINY, **overrides}), seed=seed, dtype=dtype)
    calc.params = perturb_params(calc.params, seed)
    calc.energy_bias = calc.energy_bias + jnp.arange(calc.config.ntypes)
    return calc


@pytest.fixture(scope="session")
def tiny_calc():
    return make_calc()


@pytest.fixture(scope="session")
def zbl_calc():
    return make_calc(seed=1, bridging="zbl")


@pytest.fixture(scope="session")
def mlp_bias_calc():
    return make_calc(seed=2, mlp_bias=True)


@pytest.fixture(scope="session")
def emt_file(tmp_path_factory):
    """24 EMT-labelled crystals (energies, forces, stresses) shared by the training tests: equal configs share
    their compiled steps."""
    from dpa4_jax.data import make_emt_dataset, write_extxyz

    path = tmp_path_factory.mktemp("emt") / "emt.extxyz"
    write_extxyz(make_emt_dataset(24, seed=1), path)
    return path


# The training tests' model and run: equal configs share one compiled step per mesh (see step.StepSettings).
TRAIN_MODEL = ModelConfig(type_map=("Al", "Ni", "Cu", "Au"), rcut=3.5, channels=8, n_radial=4, lmax=1, mmax=1,
                          n_blocks=1, mixing_layers=2, sel=30)
TRAIN_TEXT = yaml.safe_dump({"model": dataclasses.asdict(TRAIN_MODEL)})


def small_config(data_path, steps=6, **training) -> Config:
    defaults = dict(steps=steps, batch_atoms=40, validate_every=3, checkpoint_every=100, dtype="float64", n_budgets=1)
    return Config(model=TRAIN_MODEL, data=DataConfig(train=str(data_path), val_fraction=0.25),
                  training=TrainingConfig(**{**defaults, **training}),
                  optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2), loss=LossConfig())


def fit_on(devices, config, workdir, **kwargs):
    from dpa4_jax.train.loop import fit

    return fit(config, workdir, TRAIN_TEXT, progress=False, devices=devices, **kwargs)


def trained_params(workdir):
    return jax.tree.leaves(DPA4Calculator.from_checkpoint(workdir).params)


@pytest.fixture(scope="session")
def straight_run(emt_file, tmp_path_factory):
    """An uninterrupted 6-step run on one device, 4 sub-batches a step: what interrupted runs must end as."""
    workdir = tmp_path_factory.mktemp("straight")
    fit_on(jax.devices()[:1], small_config(emt_file, sub_batches=4), workdir)
    return workdir


def cu_au_cell(seed=0):
    """A rattled 4-atom Cu3Au cell: periodic, smaller than the cutoff (many images)."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[0] = 79
    atoms.rattle(0.1, seed=seed)
    return atoms


def triclinic_cell(seed=0):
    atoms = Atoms("SiCOSi", scaled_positions=[[0, 0, 0], [0.3, 0.2, 0.1], [0.6, 0.5, 0.7], [0.2, 0.8, 0.5]],
                  cell=[[3.3, 0.0, 0.0], [0.9, 3.1, 0.0], [0.5, 0.7, 3.4]], pbc=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def methanol():
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=3)
    return atoms


def strained(atoms, strain):
    atoms.set_cell(atoms.cell.array @ np.asarray(strain), scale_atoms=True)
    return atoms


def relaxation_set(periodic: bool = True) -> list[Atoms]:
    """Strained triclinic alloys, a vacancy, a slab with vacuum, a molecule in a box (24 atoms in all);
    with ``periodic=False`` the slab is periodic in-plane only and the molecule not at all."""
    alloy = strained(cu_au_cell(seed=1), [[1.04, 0.03, 0.0], [0.0, 0.97, 0.02], [0.01, 0.0, 1.02]])
    tri = strained(triclinic_cell(seed=2), [[0.98, 0.0, 0.02], [0.03, 1.03, 0.0], [0.0, 0.01, 1.0]])
    vacancy = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    del vacancy[3]
    vacancy.numbers[5] = 79
    vacancy.rattle(0.03, seed=4)
    slab = fcc111("Cu", size=(1, 1, 3), vacuum=3.0, a=3.7)
    slab.rattle(0.03, seed=5)
    slab.info.clear()
    boxed = methanol()
    boxed.center(vacuum=3.5)
    if periodic:
        slab.pbc = boxed.pbc = True
    return [alloy, tri, vacancy, slab, boxed]


def pytest_collection_modifyitems(items):
    """The four-device checks first: they run in a process of their own for several minutes, and with two
    workers (README) the other one works through the rest of the suite meanwhile."""
    items.sort(key=lambda item: Path(str(item.fspath)).name != "test_distributed.py")
