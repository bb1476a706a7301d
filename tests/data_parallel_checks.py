"""Data parallelism on four emulated CPU devices, run by tests/test_distributed.py in a process of its own
(``--xla_force_host_platform_device_count=4``): one step on 4 devices equals one step on 1 device with the same
global batch, runs resume on another device count, and batched relaxations end as on one device. Float64
throughout (float32 on 1, 2 and 4 devices: ``benchmarks/scaling.py``)."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from conftest import TRAIN_MODEL as MODEL
from conftest import SMALL_ZBL, fit_on, make_calc, perturb_params, relaxation_set, small_config, trained_params

from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.data import make_emt_dataset
from dpa4_jax.model import DPA4
from dpa4_jax.physics import energy_forces_virial
from dpa4_jax.relax import relax
from dpa4_jax.train import distributed
from dpa4_jax.train import loss as losses
from dpa4_jax.train.pipeline import labelled_graph
from dpa4_jax.train.step import StepSettings, make_loss_and_grad
from dpa4_jax.variables import init_variables

BUDGET = graphs.Budget(64, 1024, 5)


def stacked_batch(frames, n_sub):
    """``n_sub`` sub-batches of the frames (round robin), each padded to BUDGET, stacked on a leading axis."""
    subs = [graphs.pad(jraph.batch_np([labelled_graph(f, MODEL.type_map, MODEL.rcut) for f in frames[i::n_sub]]),
                       BUDGET) for i in range(n_sub)]
    return jax.tree.map(lambda *x: np.stack(x), *subs)


@pytest.fixture(scope="module")
def setup(emt_file):
    config = small_config(emt_file, sub_batches=4)
    frames = make_emt_dataset(12, seed=4)
    variables = init_variables(MODEL, seed=0, dtype="float64")
    variables["params"] = perturb_params(variables["params"], seed=5, scale=0.05)
    return config, frames, variables


_COMPILED = {}


def loss_and_grads(config, frames, variables, devices):
    """Loss and gradient of one step on a mesh of ``devices``, on the host (the jitted step compiled once per
    mesh)."""
    if devices not in _COMPILED:
        mesh = distributed.data_mesh(devices)
        _COMPILED[devices] = mesh, jax.jit(make_loss_and_grad(DPA4(MODEL, param_dtype=jnp.float64), StepSettings.of(config), mesh))
    mesh, compiled = _COMPILED[devices]
    batch = distributed.global_batch(stacked_batch(frames, 4), mesh)
    value, _, grads = compiled(*distributed.replicate((variables["params"], variables["stats"]), mesh), batch, 0)
    return distributed.to_host((value, grads))


def test_four_devices_equal_one(setup):
    """The same loss and gradients to rounding (float64). The optimizer that follows sees the same gradients;
    the whole step, optimizer included, is compared across device counts in the resume test below."""
    config, frames, variables = setup
    assert len(jax.devices()) == 4
    one = loss_and_grads(config, frames, variables, tuple(jax.devices()[:1]))
    four = loss_and_grads(config, frames, variables, tuple(jax.devices()))
    np.testing.assert_allclose(one[0], four[0], rtol=1e-11)
    for x, y in zip(jax.tree.leaves(one[1]), jax.tree.leaves(four[1])):
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-11 * np.abs(x).max())
    assert min(np.abs(g).max() for g in jax.tree.leaves(one[1])) > 0  # every leaf gets a gradient


def test_sub_batch_losses_add_up_to_the_global_batch(setup):
    """Eq. 43 over the global batch: the loss of the 4 stacked sub-batches is that of one batch of all frames."""
    config, frames, variables = setup
    value, _ = loss_and_grads(config, frames, variables, tuple(jax.devices()))
    model = DPA4(MODEL, param_dtype=jnp.float64)
    whole = graphs.pad(jraph.batch_np([labelled_graph(f, MODEL.type_map, MODEL.rcut) for f in frames]),
                       graphs.Budget(200, 8192, 14))
    whole_loss = jax.jit(lambda v, g: losses.loss(energy_forces_virial(model, v, g), g, config.loss)[0])
    np.testing.assert_allclose(float(value), float(whole_loss(variables, jax.tree.map(jnp.asarray, whole))), rtol=1e-12)


def test_resume_on_another_device_count(emt_file, tmp_path):
    """Killed after 2 of 6 steps on 4 devices and resumed on 1, and the reverse: the same parameters (float64;
    the 4-device sums differ from the 1-device ones in the last bits). With test_train's kill and resume on
    one device, which equals the uninterrupted run, this is resuming on any device count."""
    config = small_config(emt_file, sub_batches=4)
    one, four = jax.devices()[:1], jax.devices()
    for name, first, then in (("4-then-1", four, one), ("1-then-4", one, four)):
        fit_on(first, config, tmp_path / name, stop_after=2)
        fit_on(then, config, tmp_path / name)
    for x, y in zip(trained_params(tmp_path / "4-then-1"), trained_params(tmp_path / "1-then-4")):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    raw = jax.tree.leaves(DPA4Calculator.from_checkpoint(tmp_path / "1-then-4", ema=False).params)
    start = jax.tree.leaves(init_variables(MODEL, seed=config.training.seed, dtype="float64")["params"])
    assert max(np.abs(x - s).max() for x, s in zip(raw, start)) > 1e-6  # the runs trained (by ~1e-5 here)


def test_relax_on_four_devices_equals_one():
    """``dpa4_jax.relax`` shares its batches over the 4 devices: each structure ends where it ends on one device
    (the same FIRE steps, positions, cells and energies; float64), one compilation per mesh."""
    calc = make_calc(seed=3, **SMALL_ZBL)
    structures = relaxation_set() * 2  # 10 structures, 3 to a batch: every device gets work, some two batches
    settings = dict(batch_atoms=24, batch_edges=768, skin=0.3, progress=False)
    one = relax(calc, structures, 0.1, 20, devices=jax.local_devices()[:1], **settings)
    four = relax(calc, structures, 0.1, 20, devices=jax.local_devices(), **settings)
    assert len(jax.local_devices()) == 4 and one.compilations == four.compilations == 1
    for a, b in zip(one, four, strict=True):
        assert (a.info["steps"], a.info["converged"]) == (b.info["steps"], b.info["converged"])
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-10)
        np.testing.assert_allclose(b.cell.array, a.cell.array, atol=1e-10)
        assert abs(b.get_potential_energy() - a.get_potential_energy()) < 1e-10 * len(a)
    assert len({a.info["steps"] for a in one}) > 1  # the structures leave their slots at different steps
