"""Training: the loss of Eq. 43, the jitted step, resumption, checkpoints and the trained model."""

import csv
import itertools
import math

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from conftest import fit_on, small_config, trained_params

from dpa4_jax import checkpoint
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.config import ConfigError, LossConfig, load_config
from dpa4_jax.data import make_emt_dataset
from dpa4_jax.train import distributed, loop
from dpa4_jax.train import loss as losses
from dpa4_jax.train.data import BatchSize, batch_plan, plan_budgets
from dpa4_jax.train.metrics import FIELDS
from dpa4_jax.train.pipeline import load_batches

ONE = jax.devices()[:1]  # the tests of runs share one device's compiled step; test_distributed covers four


def test_loss_is_eq43_by_hand():
    """Energy MAE per atom, mean force-error norm, virial MAE per atom (labels where present)."""
    rng = np.random.default_rng(0)
    sizes = [3, 5]
    g = jraph.GraphsTuple(
        nodes={"forces": rng.normal(size=(8, 3)), "force_mask": np.array([True] * 3 + [False] * 5)},
        edges=None, senders=np.zeros(0, int), receivers=np.zeros(0, int),
        globals={"energy": np.array([1.0, -2.0]), "energy_mask": np.array([True, True]),
                 "virial": rng.normal(size=(2, 3, 3)), "virial_mask": np.array([False, True]),
                 "cell": np.stack([np.zeros((3, 3)), 4 * np.eye(3)])},
        n_node=np.array(sizes), n_edge=np.array([0, 0]))
    g = jraph.pad_with_graphs(g, 10, 0, 3)
    out = {"energy": np.array([1.5, -1.0, 7.0]), "forces": rng.normal(size=(10, 3)), "virial": rng.normal(size=(3, 3, 3))}
    weights = LossConfig(energy=2.0, forces=3.0, virial=5.0)
    total, _ = losses.loss(jax.tree.map(jnp.asarray, out), jax.tree.map(jnp.asarray, g), weights)
    e = (abs(1.5 - 1.0) / 3 + abs(-1.0 + 2.0) / 5) / 2
    f = np.mean([np.linalg.norm(out["forces"][i] - g.nodes["forces"][i]) for i in range(3)])
    v = np.abs(out["virial"][1] - g.globals["virial"][1]).sum() / 9 / 5
    np.testing.assert_allclose(float(total), 2 * e + 3 * f + 5 * v, rtol=1e-12)


def test_batches_follow_the_atom_budget_rule():
    n_atoms = np.array([10] * 7 + [3] * 9)
    batches = batch_plan(n_atoms, 25, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(16))
    for b in batches[:-1]:
        assert n_atoms[b].sum() >= 25 and n_atoms[b[:-1]].sum() < 25  # stop as soon as K atoms are reached
    # equal sizes: ceil(K / N) structures per batch, the paper's rule
    assert all(len(b) == math.ceil(1500 / 108) for b in batch_plan(np.full(100, 108), 1500, np.random.default_rng(1))[:-1])
    sizes = [BatchSize(n, 20 * n, 3) for n in range(50, 90)]
    budgets = plan_budgets(sizes, 3)
    assert len(budgets) <= 3 and all(any(s.fits(b) for b in budgets) for s in sizes)


def test_resume_after_kill_equals_uninterrupted_run(emt_file, straight_run, tmp_path):
    config = small_config(emt_file, sub_batches=4)
    fit_on(ONE, config, tmp_path, stop_after=2)  # "killed" after 2 steps
    assert not (tmp_path / "model").exists()
    fit_on(ONE, config, tmp_path)  # resumes at step 2
    for x, y in zip(trained_params(straight_run), trained_params(tmp_path)):
        np.testing.assert_array_equal(x, y)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "3", "6"]
    # The trained model is what the calculator loads, and it predicts the training data's scale.
    atoms = make_emt_dataset(1, seed=5)[0].to_atoms()
    atoms.calc = DPA4Calculator.from_checkpoint(tmp_path)
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_forces().shape == (len(atoms), 3)


def test_both_weights_are_validated_and_the_config_chooses_the_saved_ones(emt_file, straight_run, tmp_path):
    """The straight run again with ``training.final_weights: raw``: the same numbers, the raw and EMA columns
    of ``metrics.csv`` swapped, and the saved model holds the raw weights of the last step."""
    fit_on(ONE, small_config(emt_file, sub_batches=4, final_weights="raw"), tmp_path)
    raw_saved = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    ema_saved = list(csv.DictReader(open(straight_run / "metrics.csv")))
    assert len(raw_saved) == len(ema_saved) == 3
    for row, twin in zip(raw_saved, ema_saved):
        assert (row["force_mae"], row["ema_force_mae"]) == (twin["raw_force_mae"], twin["force_mae"])
    assert raw_saved[0]["force_mae"] == raw_saved[0]["ema_force_mae"]  # before the first step they are one
    assert float(raw_saved[-1]["force_mae"]) != float(raw_saved[-1]["ema_force_mae"])  # the EMA lags
    last = checkpoint.load_raw(checkpoint.list_checkpoints(straight_run)[-1])["state"]["params"]
    for x, y in zip(jax.tree.leaves(last), jax.tree.leaves(checkpoint.load_model(tmp_path / "model")[1]["params"]),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_crash_in_a_checkpoint_write_and_a_damaged_checkpoint_lose_nothing(emt_file, straight_run, tmp_path,
                                                                          monkeypatch, caplog):
    """A process that dies inside the step-4 checkpoint write leaves the step-2 one to resume from; a
    checkpoint damaged on disk afterwards is skipped with a warning. Both end as the uninterrupted run."""
    config = small_config(emt_file, sub_batches=4, checkpoint_every=2)
    real = checkpoint.serialization.to_bytes

    def dies_at_step_4(tree):
        if int(tree["state"].step) == 4:
            raise SystemExit("killed while writing")
        return real(tree)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.serialization, "to_bytes", dies_at_step_4)
        with pytest.raises(SystemExit):
            fit_on(ONE, config, tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002"]
    fit_on(ONE, config, tmp_path, stop_after=2)  # to step 4: checkpoints 2 and 4
    damaged = checkpoint.list_checkpoints(tmp_path)[-1] / "state.msgpack"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        fit_on(ONE, config, tmp_path)
    assert "step_00000004 is damaged" in caplog.text
    for x, y in zip(trained_params(straight_run), trained_params(tmp_path)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_is_skipped_or_stops_naming_the_step(emt_file, tmp_path, monkeypatch, policy):
    """A batch whose labels make the loss infinite (step 3): its update is skipped and counted, or training
    stops naming the step and its structures; the parameters stay finite either way."""
    config = small_config(emt_file, sub_batches=4, on_nonfinite=policy)
    served = itertools.count(1)

    def poisoned(source, items, mesh, type_map, cutoff, workers=0):  # the training batches, once per epoch
        for batch in load_batches(source, items, type_map, cutoff, workers=workers):
            if next(served) == 3:
                batch.globals["energy"][0, 0] = np.inf
            yield distributed.global_batch(batch, mesh)

    monkeypatch.setattr(loop, "device_batches", poisoned)
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"step 3: non-finite loss or gradient; structures .*emt\.extxyz"):
            fit_on(ONE, config, tmp_path)
    else:
        fit_on(ONE, config, tmp_path)
        rows = (tmp_path / "metrics.csv").read_text().splitlines()
        assert rows[-1].split(",")[FIELDS.index("skipped_steps")] == "1"
    state = checkpoint.load_raw(checkpoint.list_checkpoints(tmp_path)[-1])["state"]
    assert int(state["skipped"]) == 1 and int(state["last_skipped"]) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_config_errors_name_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  type_map: [Cu]\ndata:\n  train: nowhere.xyz\ntraining:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key\(s\) training\.stpes"):
        load_config(path)
    path.write_text("model:\n  type_map: [Cu]\ndata:\n  train: nowhere.xyz\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: data\.train: nowhere\.xyz does not exist"):
        load_config(path)
    path.write_text("model:\n  type_map: [Cu]\ndata:\n  train: x.xyz\n  demo_frames: 5\noptimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected a number"):
        load_config(path)
