"""The training loop: data sources, energy bias, resumable data-parallel epochs, validation, checkpoints.

``fit`` reads the data, then a :class:`Trainer` runs steps until ``training.steps``:
each step is ``training.sub_batches`` per-device batches (one per device by
default) built by the host pipeline, split over the devices, and one jitted
update. Only process 0 writes (checkpoints, metrics, plots); every process
computes the same plan from the seed, so a restart, on any number of devices,
continues with the same batches.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import logging
import signal
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml
from ase.data import chemical_symbols
from tqdm.auto import tqdm

from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DTYPES, init_variables
from dpa4_jax.config import Config, ConfigError, resolve_path
from dpa4_jax.data import fit_energy_bias, make_emt_dataset, read_frames, write_extxyz
from dpa4_jax.data.store import FrameStore, InMemoryFrames
from dpa4_jax.data.validate import check_elements
from dpa4_jax.evaluate import Evaluator
from dpa4_jax.train import checkpoint, distributed, finetune
from dpa4_jax.train.data import Batcher, Subset, epoch_steps
from dpa4_jax.train.pipeline import load_batches
from dpa4_jax.train.step import init_state, training_functions

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the step)
BIAS_SAMPLE = 100_000  # frames sampled for the energy-bias fit of a large data set
FIELDS = ["step", "epoch", "lr", "loss", "energy_mae", "force_mae", "stress_mae", "energy_rmse", "force_rmse",
          "stress_rmse", "skipped_steps", "elapsed_s"]


# ----------------------------------------------------------------------------- data


def open_source(paths, config: Config, base: Path, key: str):
    """One frame source from ``data.<key>``'s paths: a prepared store (memory-mapped, any size), or raw files
    read into memory (small sets)."""
    d, rcut = config.data, config.model.rcut
    resolved = [resolve_path(p, base) for p in paths]
    stores = [p for p in resolved if (p / "meta.json").is_file()]  # a prepared FrameStore
    if stores:
        if len(resolved) > 1:
            raise ConfigError(f"data.{key}: a prepared store must be the only path (prepare several sources "
                              f"into one store), got {list(paths)}")
        store = FrameStore.open(stores[0])
        missing = sorted(set(chemical_symbols[z] for z in store.elements()) - set(config.model.type_map))
        if missing:  # before anything compiles
            raise ConfigError(f"data.{key}: {stores[0]} holds elements {missing} that model.type_map lacks")
        if abs(store.cutoff - rcut) > 1e-9:
            raise ConfigError(f"data.{key}: {stores[0]} counted edges at cutoff {store.cutoff} Å, the model's rcut "
                              f"is {rcut} Å; prepare it again with --cutoff {rcut}")
        return store
    keys = dict(energy_key=d.energy_key, forces_key=d.forces_key, stress_key=d.stress_key)
    frames = []
    for path in resolved:
        fmt = (d.format or "").lower() or None
        kw = {"energy_key": d.mptrj_energy_key} if (fmt == "mptrj" or path.suffix == ".json") else (
            {} if (fmt == "deepmd" or path.is_dir()) else keys)
        frames += itertools.islice(read_frames(path, format=d.format, min_pair_dist=d.min_pair_dist,
                                               on_bad_frame=d.on_bad_frame, **kw), d.max_frames)
    check_elements(frames, config.model.type_map)  # before anything compiles
    return InMemoryFrames(frames, rcut, workers=d.workers)


def read_data(config: Config, base: Path):
    """``(train, validation)`` frame sources (generating the EMT demo set first when configured)."""
    d = config.data
    if d.demo_frames > 0:
        target = resolve_path(d.train[0], base)
        if not target.exists():
            log.info("generating %d EMT demo frames into %s", d.demo_frames, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_extxyz(make_emt_dataset(d.demo_frames, seed=config.training.seed), target)
    train = open_source(d.train, config, base, "train")
    if d.validation:
        val = open_source(d.validation, config, base, "validation")
    else:
        order = np.random.default_rng(config.training.seed).permutation(len(train))
        n_val = int(round(d.val_fraction * len(train)))
        train, val = Subset(train, np.sort(order[n_val:])), Subset(train, np.sort(order[:n_val]))
    if not len(train):
        raise ConfigError(f"data.train {list(d.train)}: no frames")
    if config.training.max_val_frames is not None:
        val = Subset(val, np.arange(min(len(val), config.training.max_val_frames)))
    return train, val


def energy_bias(source, type_map, seed: int, fixed: dict[int, float] | None = None) -> np.ndarray:
    """Per-element energies fitted on the frames (a random sample of ``BIAS_SAMPLE`` for large sets); the
    types in ``fixed`` keep their given values."""
    picked = np.arange(len(source))
    if len(picked) > BIAS_SAMPLE:
        picked = np.sort(np.random.default_rng(seed).choice(len(picked), BIAS_SAMPLE, replace=False))
    return fit_energy_bias((source.composition(int(i)) for i in picked), type_map, fixed=fixed)


# ----------------------------------------------------------------------------- the run


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


class Trainer:
    """The state of one run: model, optimizer state on the devices, data position, padded shapes, metrics."""

    def __init__(self, config: Config, workdir: Path, mesh, train, val):
        self.config, self.workdir, self.mesh, self.train = config, workdir, mesh, train
        t = config.training
        self.sub_batches = t.sub_batches or mesh.devices.size
        self.local = distributed.local_sub_batches(self.sub_batches, mesh)
        self.model, self.tx, self.schedule, self.step_fn = training_functions(config, mesh)
        state, stats, self.position, budgets = self._start_or_resume()
        self.state, self.stats = distributed.replicate((state, stats), mesh)
        self.step = int(state.step)  # kept on the host: reading state.step would wait for every step
        if budgets is None:
            first = epoch_steps(train.n_atoms, t.batch_atoms, self.sub_batches, t.seed, 0)
            self.batcher = Batcher.planned(train.n_atoms, train.n_edges, first, t.n_budgets)
        else:
            self.batcher = Batcher(train.n_atoms, train.n_edges, budgets)
        self.validator = Evaluator(self.model, val, config.model.type_map, config.model.rcut, t.batch_atoms,
                                   t.n_budgets, mesh, workers=config.data.workers)
        self.metrics_path = workdir / "metrics.csv"
        if distributed.is_main_process():
            _forget_rows_after(self.metrics_path, self.step)
        self.start_time = time.time()
        self.recent = collections.deque(maxlen=LOG_EVERY)  # (step, frame indices) of the latest steps
        self.skipped_seen = int(state.skipped)  # skipped steps of earlier runs were reported by those runs

    def _start_or_resume(self):
        t = self.config.training
        variables = init_variables(self.config.model, seed=t.seed, dtype=t.dtype)
        state = init_state(variables["params"], self.tx)
        found = checkpoint.restore_latest(self.workdir, distributed.to_host(state), variables["stats"])
        if found is None:
            seen = None
            if t.init_model:  # only at the start: a resumed fine-tuning run restores its own checkpoints
                variables, seen = finetune.pretrained_start(self.config, variables)
                state = init_state(variables["params"], self.tx)
            fixed = finetune.fixed_energy_bias(t.energy_bias, self.config.model.type_map,
                                               np.asarray(variables["stats"]["energy_bias"]), seen)
            bias = energy_bias(self.train, self.config.model.type_map, t.seed, fixed)
            return state, {"energy_bias": jnp.asarray(bias, DTYPES[t.dtype])}, {"epoch": 0, "batch": 0}, None
        path, state, stats, meta = found
        log.info("resuming from %s (step %d)", path, int(state.step))
        position = {"epoch": meta["epoch"], "batch": meta["batch"]}
        return state, stats, position, [graphs.Budget(*b) for b in meta["budgets"]]

    # --- writing (process 0 only)

    def save(self) -> None:
        if distributed.is_main_process():
            meta = dict(self.position, budgets=[[b.n_node, b.n_edge, b.n_graph] for b in self.batcher.budgets],
                        sub_batches=self.sub_batches, devices=int(self.mesh.devices.size))
            checkpoint.save(self.workdir, self.step, distributed.to_host(self.state), distributed.to_host(self.stats),
                            meta, keep=self.config.training.keep_checkpoints)

    def validate(self, loss_value: float) -> dict:
        result = self.validator({"params": self.state.ema_params, "stats": self.stats})
        if distributed.is_main_process():
            step = self.step
            row = dict(step=step, epoch=self.position["epoch"], lr=float(self.schedule(max(step - 1, 0))),
                       loss=loss_value, skipped_steps=int(self.state.skipped),
                       elapsed_s=round(time.time() - self.start_time, 1),
                       **{k: result.get(k, float("nan")) for k in FIELDS[4:10]})
            new = not self.metrics_path.exists()
            with open(self.metrics_path, "a", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
        return result

    # --- steps

    def epoch_specs(self):
        """This epoch's remaining steps (frame indices of every sub-batch) and this process's share of each."""
        t = self.config.training
        steps = epoch_steps(self.train.n_atoms, t.batch_atoms, self.sub_batches, t.seed, self.position["epoch"],
                            start=self.position["batch"])
        return steps, [self.batcher.spec(s, self.local) for s in steps]

    def check_finite(self) -> None:
        """Reports steps skipped for a non-finite loss or gradient since the last check (or stops, as
        ``training.on_nonfinite`` says), naming the step and its structures."""
        skipped = int(self.state.skipped)
        if skipped == self.skipped_seen:
            return
        self.skipped_seen = skipped
        bad = int(self.state.last_skipped)
        frames = next((np.concatenate(f) for s, f in self.recent if s == bad), np.zeros(0, int))
        names = ", ".join(self.train.name(int(i)) for i in frames[:8]) or "(not recorded)"
        message = f"step {bad}: non-finite loss or gradient; structures {names}"
        if self.config.training.on_nonfinite == "stop":
            self.save()  # the bad update was not applied: the state is clean
            raise FloatingPointError(message + "; checkpoint saved")
        log.warning("%s; update skipped (%d skipped in all)", message, skipped)

    def batches(self):
        """``(frame indices, global batch)`` of every step from the current position on, epoch after epoch.
        Time spent waiting for the host pipeline adds to ``host_wait_s``."""
        while True:
            steps, specs = self.epoch_specs()
            with contextlib.closing(load_batches(self.train, specs, self.config.model.type_map,
                                                 self.config.model.rcut, workers=self.config.data.workers)) as built:
                for frames in steps:
                    waited = time.perf_counter()
                    batch = next(built)
                    self.host_wait_s += time.perf_counter() - waited
                    yield frames, distributed.global_batch(batch, self.mesh)
            self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}

    def take_step(self, frames, batch) -> dict:
        self.state, metrics = self.step_fn(self.state, self.stats, batch)  # returns at once (async dispatch)
        self.step += 1
        self.position["batch"] += self.sub_batches
        self.recent.append((self.step, frames))
        self.structures += sum(len(f) for f in frames)
        return metrics

    def report(self, bar, metrics, result) -> None:
        """Loss, throughput and the fraction of time spent waiting for the host pipeline, on the progress bar."""
        loss_value = float(metrics["loss"])  # waits for the step
        self.check_finite()
        now = time.perf_counter()
        elapsed = max(now - self.tick, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4g}", F_mae=f"{result.get('force_mae', float('nan')):.1f}",
                        struct_s=f"{self.structures / elapsed:.1f}", host_wait=f"{self.host_wait_s / elapsed:.0%}")
        self.tick, self.structures, self.host_wait_s = now, 0, 0.0

    def run(self, stop_after: int | None, progress: bool) -> dict:
        t = self.config.training
        result = self.validate(float("nan")) if self.step == 0 else {}  # the start of the learning curve
        bar = tqdm(total=t.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (progress and distributed.is_main_process()))
        self.tick, self.structures, self.host_wait_s = time.perf_counter(), 0, 0.0
        with _StopRequest() as stop, contextlib.closing(self.batches()) as stream:
            for this_call, (frames, batch) in enumerate(stream if self.step < t.steps else (), 1):
                metrics = self.take_step(frames, batch)
                step = self.step
                if step % LOG_EVERY == 0 or step == t.steps:
                    self.report(bar, metrics, result)
                bar.update(1)
                if step % t.validate_every == 0 or step == t.steps:
                    result = self.validate(float(metrics["loss"]))
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
                last = step == t.steps or (stop_after is not None and this_call >= stop_after) or stop.requested
                if step % t.checkpoint_every == 0 or last:
                    self.check_finite()
                    self.save()
                if last:
                    break
        bar.close()
        log.info("%d compilation(s) of the training step; %.1f%% of padded edge slots unused",
                 self.step_fn._cache_size(), 100 * self.batcher.padding_waste)
        return result


def _forget_rows_after(metrics_path: Path, step: int) -> None:
    """A run resumed at ``step`` redoes the steps after it: drop their rows (written before a crash)."""
    if metrics_path.exists():
        rows = list(csv.DictReader(open(metrics_path)))
        kept = [r for r in rows if int(r["step"]) <= step]
        if len(kept) < len(rows):
            with open(metrics_path, "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(kept)


def _claim_workdir(workdir: Path, config_text: str) -> None:
    """Store the run's config; refuse a work directory that holds a run of another model."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "config.yaml").exists():
        previous = yaml.safe_load((workdir / "config.yaml").read_text())
        if previous.get("model") != yaml.safe_load(config_text).get("model"):
            raise ValueError(f"{workdir}: holds a run with a different model section; use another --workdir")
    (workdir / "config.yaml").write_text(config_text)


def fit(config: Config, workdir: str | Path, config_text: str, base: Path = Path("."),
        stop_after: int | None = None, progress: bool = True, devices=None) -> dict:
    """Train (or resume) in ``workdir`` on ``devices`` (default: all, of all processes). Returns the final
    validation metrics.

    ``stop_after`` stops (with a checkpoint) after that many steps of this call, as a kill would.
    """
    distributed.initialize()
    workdir = Path(workdir)
    if distributed.is_main_process():
        _claim_workdir(workdir, config_text)
    train, val = read_data(config, base)
    log.info("%d training and %d validation frames", len(train), len(val))
    trainer = Trainer(config, workdir, distributed.data_mesh(devices), train, val)
    result = trainer.run(stop_after, progress)
    if trainer.step >= config.training.steps and distributed.is_main_process():
        variables = distributed.to_host({"params": trainer.state.ema_params, "stats": trainer.stats})
        checkpoint.save_model(workdir, variables, config_text)
        plot_learning_curve(trainer.metrics_path, workdir / "learning_curve.png")
    return result


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
