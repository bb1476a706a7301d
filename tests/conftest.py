"""Shared fixtures: float64 on, four emulated CPU devices, tiny models, structures.

Tests need 64-bit JAX for finite differences and tight symmetry checks; float32
models still compute in float32 (their parameters and inputs are cast).
"""

import os
from pathlib import Path

# Four emulated CPU devices for the data-parallel tests (set before JAX starts; other tests use the default
# device only). A user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

from dpa4_jax.calculator import DPA4Calculator  # noqa: E402
from dpa4_jax.config import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPA4_SHARED_DATA", ROOT.parent / "shared" / "data"))

# A small model that still has every part of DPA4: two focus streams with rank-2
# edge-node products, attention, the Lebedev FFN, L = 2 with m-truncation.
TINY = dict(type_map=("H", "C", "O", "Si", "Cu", "Au"), channels=16, lmax=2, mmax=1, n_blocks=2, mixing_layers=2,
            n_radial=8, rcut=4.0, n_focus=2, radial_so2_rank=2)


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
