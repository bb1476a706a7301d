"""The training loop: data, energy bias, resumable epochs, validation, checkpoints, the final model."""

from __future__ import annotations

import csv
import itertools
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DTYPES, init_variables
from dpa4_jax.config import Config, resolve_path
from dpa4_jax.data import fit_energy_bias, make_emt_dataset, read_frames, split_frames, write_extxyz
from dpa4_jax.train import checkpoint
from dpa4_jax.train import loss as losses
from dpa4_jax.train.data import Batcher, GraphDataset, batch_plan, plan_budgets, prefetch
from dpa4_jax.train.step import init_state, make_eval_step, training_functions

log = logging.getLogger(__name__)


def read_data(config: Config, base: Path) -> tuple[list, list]:
    """Training and validation frames (generating the EMT demo set first when configured)."""
    d = config.data
    keys = dict(energy_key=d.energy_key, forces_key=d.forces_key, stress_key=d.stress_key)

    def read(paths):
        frames = []
        for p in paths:
            path = resolve_path(p, base)
            fmt = (d.format or "").lower() or None
            kw = {"energy_key": d.mptrj_energy_key} if (fmt == "mptrj" or path.suffix == ".json") else (
                {} if (fmt == "deepmd" or path.is_dir()) else keys)
            frames += list(itertools.islice(read_frames(path, format=d.format, **kw), d.max_frames))
        return frames

    if d.demo_frames > 0:
        target = resolve_path(d.train[0], base)
        if not target.exists():
            log.info("generating %d EMT demo frames into %s", d.demo_frames, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_extxyz(make_emt_dataset(d.demo_frames, seed=config.training.seed), target)
    train = read(d.train)
    if d.validation:
        val = read(d.validation)
    else:
        train, val = split_frames(train, d.val_fraction, seed=config.training.seed)
    if not train:
        raise ValueError(f"data.train {list(d.train)}: no frames")
    if config.training.max_val_frames is not None:
        val = val[:config.training.max_val_frames]
    return train, val


class Validator:
    """Errors of a model on a fixed data set, batched once with its own padded shapes."""

    def __init__(self, model, dataset: GraphDataset, batch_atoms: int, n_budgets: int):
        self.dataset = dataset
        self.batches = batch_plan(dataset.n_atoms, batch_atoms, np.random.default_rng(0)) if len(dataset) else []
        self.batcher = Batcher(dataset, plan_budgets([dataset.size_of(b) for b in self.batches], n_budgets)) \
            if self.batches else None
        self.evaluate = make_eval_step(model)

    def __call__(self, variables) -> dict[str, float]:
        if not self.batches:
            return {}
        total = None
        for batch in prefetch(self.batcher.make, self.batches):
            sums = self.evaluate(variables, jax.tree.map(jnp.asarray, batch))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return losses.summarize(jax.device_get(total))


class _StopRequest:
    """Turns SIGINT/SIGTERM into a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(config: Config, workdir: str | Path, config_text: str, base: Path = Path("."),
        stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) in ``workdir``. Returns the final validation metrics.

    ``stop_after`` stops (with a checkpoint) after that many steps of this call, as a kill would.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = config.training
    if (workdir / "config.yaml").exists():
        previous = yaml.safe_load((workdir / "config.yaml").read_text())
        if previous.get("model") != yaml.safe_load(config_text).get("model"):
            raise ValueError(f"{workdir}: holds a run with a different model section; use another --workdir")
    (workdir / "config.yaml").write_text(config_text)

    train_frames, val_frames = read_data(config, base)
    cutoff, type_map = config.model.rcut, config.model.type_map
    train_set = GraphDataset(train_frames, type_map, cutoff)
    val_set = GraphDataset(val_frames, type_map, cutoff)
    log.info("%d training and %d validation frames", len(train_set), len(val_set))

    model, tx, schedule, step_fn = training_functions(config)
    variables = init_variables(config.model, seed=t.seed, dtype=t.dtype)
    state = init_state(variables["params"], tx)
    stats = variables["stats"]
    position = {"epoch": 0, "batch": 0}
    budgets = None
    latest = checkpoint.list_checkpoints(workdir)
    if latest:
        state, stats, meta = checkpoint.restore(latest[-1], state, stats)
        position = {"epoch": meta["epoch"], "batch": meta["batch"]}
        budgets = [graphs.Budget(*b) for b in meta["budgets"]]
        log.info("resuming from %s (step %d)", latest[-1], int(state.step))
    else:
        bias = fit_energy_bias(train_frames, type_map)
        stats = {"energy_bias": jnp.asarray(bias, DTYPES[t.dtype])}

    if budgets is None:
        plan0 = batch_plan(train_set.n_atoms, t.batch_atoms, np.random.default_rng([t.seed, 0]))
        train_set.n_edges(progress)
        budgets = plan_budgets([train_set.size_of(b) for b in plan0], t.n_budgets)
    batcher = Batcher(train_set, budgets)
    validator = Validator(model, val_set, t.batch_atoms, t.n_budgets)

    metrics_path = workdir / "metrics.csv"
    fields = ["step", "epoch", "lr", "loss", "energy_mae", "force_mae", "stress_mae", "energy_rmse", "force_rmse",
              "stress_rmse", "elapsed_s"]
    if not metrics_path.exists():
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)

    def save(step):
        meta = dict(position, budgets=[list(dataclass_tuple(b)) for b in batcher.budgets])
        checkpoint.save(workdir, step, state, stats, meta, keep=t.keep_checkpoints)

    def validate(step, loss_value):
        result = validator({"params": state.ema_params, "stats": stats})
        row = dict(step=step, epoch=position["epoch"], lr=float(schedule(max(step - 1, 0))), loss=loss_value,
                   elapsed_s=round(time.time() - start, 1), **{k: result.get(k, float("nan")) for k in fields[4:10]})
        with open(metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fields).writerow(row)
        return result

    step = int(state.step)
    start = time.time()
    bar = tqdm(total=t.steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    result, loss_value, steps_this_call = {}, float("nan"), 0
    atoms_done = structures_done = 0
    tick = time.time()
    if step == 0:  # the starting point of the learning curve
        result = validate(0, float("nan"))
    with _StopRequest() as stop:
        while step < t.steps:
            plan = batch_plan(train_set.n_atoms, t.batch_atoms, np.random.default_rng([t.seed, position["epoch"]]))
            for batch in prefetch(batcher.make, plan[position["batch"]:]):
                n_real = int(np.sum(batch.n_node[:-1]))
                state, metrics = step_fn(state, stats, jax.tree.map(jnp.asarray, batch))
                step += 1
                steps_this_call += 1
                position["batch"] += 1
                atoms_done += n_real
                structures_done += len(batch.n_node) - 1
                if step % 10 == 0 or step == t.steps:
                    loss_value = float(metrics["loss"])
                    if not math.isfinite(loss_value):
                        save(step)
                        raise FloatingPointError(f"loss is {loss_value} at step {step}; checkpoint saved")
                    elapsed = max(time.time() - tick, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.4g}", F_mae=f"{result.get('force_mae', float('nan')):.1f}",
                                    struct_s=f"{structures_done / elapsed:.1f}", atoms_s=f"{atoms_done / elapsed:.0f}")
                    atoms_done = structures_done = 0
                    tick = time.time()
                bar.update(1)
                if step % t.validate_every == 0 or step == t.steps:
                    result = validate(step, float(metrics["loss"]))
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
                last = step == t.steps or (stop_after is not None and steps_this_call >= stop_after) or stop.requested
                if step % t.checkpoint_every == 0 or last:
                    save(step)
                if last:
                    break
            else:
                position = {"epoch": position["epoch"] + 1, "batch": 0}
                continue
            break
    bar.close()
    log.info("%d compilation(s) of the training step; %.1f%% of padded edge slots unused",
             step_fn._cache_size(), 100 * batcher.padding_waste)
    if step >= t.steps:
        checkpoint.save_model(workdir, {"params": state.ema_params, "stats": stats}, config_text)
        plot_learning_curve(metrics_path, workdir / "learning_curve.png")
    return result


def dataclass_tuple(b: graphs.Budget) -> tuple[int, int, int]:
    return (b.n_node, b.n_edge, b.n_graph)


def plot_learning_curve(metrics_path: Path, png: Path) -> None:
    """Validation energy and force MAE against the step (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(open(metrics_path)))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, unit in zip(axes, ("energy_mae", "force_mae"), ("meV/atom", "meV/Å")):
        ax.plot(steps, [float(r[key]) for r in rows], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key.split('_')[0]} MAE ({unit})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
