"""The training loop: resumable data-parallel epochs, validation of both weights, checkpoints.

``fit`` opens the data (:mod:`dpa4_jax.train.sources`), then a :class:`Trainer` runs steps until
``training.steps``: each step is ``training.sub_batches`` per-device batches (one per device by default) built
by the host pipeline, split over the devices, and one jitted update. Only process 0 writes (checkpoints,
metrics, plots); every process computes the same plan from the seed, so a restart, on any number of devices,
continues with the same batches. Where a run starts is :mod:`dpa4_jax.train.start`'s; its metrics log is
:mod:`dpa4_jax.train.metrics`'.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from dpa4_jax import checkpoint
from dpa4_jax.config import Config
from dpa4_jax.train import distributed
from dpa4_jax.train.data import Batcher, epoch_steps
from dpa4_jax.train.metrics import ERRORS, MetricsLog, other_weights
from dpa4_jax.train.pipeline import device_batches
from dpa4_jax.train.sources import read_data
from dpa4_jax.train.start import start_or_resume
from dpa4_jax.train.step import training_functions
from dpa4_jax.train.validation import Evaluator

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between reads of the loss from the device (each read waits for the step)


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


class _Progress:
    """The progress bar: loss, the latest validation force MAE of both weights, structures per second and the
    fraction of time spent waiting for the host pipeline since the last report."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.tick, self.structures, self.host_wait_s = time.perf_counter(), 0, 0.0

    def show(self, loss_value: float, result: dict) -> None:
        now = time.perf_counter()
        elapsed = max(now - self.tick, 1e-9)
        force = {w: result.get(w, {}).get("force_mae", float("nan")) for w in ("ema", "raw")}
        self.bar.set_postfix(loss=f"{loss_value:.4g}", F_ema=f"{force['ema']:.1f}", F_raw=f"{force['raw']:.1f}",
                             struct_s=f"{self.structures / elapsed:.1f}",
                             host_wait=f"{self.host_wait_s / elapsed:.0%}")
        self.tick, self.structures, self.host_wait_s = now, 0, 0.0


class Trainer:
    """The step loop of one run: the state on the devices, the data position, validation and checkpoints."""

    def __init__(self, config: Config, workdir: Path, mesh, train, val):
        self.config, self.workdir, self.mesh, self.train = config, workdir, mesh, train
        t = config.training
        self.sub_batches = t.sub_batches or mesh.devices.size
        self.local = distributed.local_sub_batches(self.sub_batches, mesh)
        self.model, tx, self.schedule, self.step_fn = training_functions(config, mesh)
        start = start_or_resume(config, workdir, tx, train)
        self.state, self.stats = distributed.replicate((start.state, start.stats), mesh)
        self.position = start.position
        self.step = int(start.state.step)  # kept on the host: reading state.step would wait for every step
        if start.budgets is None:
            first = epoch_steps(train.n_atoms, t.batch_atoms, self.sub_batches, t.seed, 0)
            self.batcher = Batcher.planned(train.n_atoms, train.n_edges, first, t.n_budgets)
        else:
            self.batcher = Batcher(train.n_atoms, train.n_edges, start.budgets)
        self.validator = Evaluator(self.model, val, config.model.type_map, config.model.rcut, t.batch_atoms,
                                   t.n_budgets, mesh, workers=config.data.workers)
        self.metrics = MetricsLog(workdir / "metrics.csv", t.final_weights)
        if distributed.is_main_process():
            self.metrics.forget_after(self.step)
        self.start_time = time.time()
        self.recent = collections.deque(maxlen=LOG_EVERY)  # (step, frame indices) of the latest steps
        self.skipped_seen = int(start.state.skipped)  # skipped steps of earlier runs were reported by those runs

    def weights(self, which: str) -> dict:
        """The ``"ema"`` or ``"raw"`` variables on the devices."""
        params = self.state.ema_params if which == "ema" else self.state.params
        return {"params": params, "stats": self.stats}

    # --- writing (process 0 only)

    def save(self) -> None:
        if distributed.is_main_process():
            meta = dict(self.position, budgets=[[b.n_node, b.n_edge, b.n_graph] for b in self.batcher.budgets],
                        sub_batches=self.sub_batches, devices=int(self.mesh.devices.size))
            checkpoint.save(self.workdir, self.step, distributed.to_host(self.state), distributed.to_host(self.stats),
                            meta, keep=self.config.training.keep_checkpoints)

    def validate(self, loss_value: float) -> dict:
        """Errors of both weights on the validation frames: ``{"ema": ..., "raw": ...}``, each
        :func:`dpa4_jax.train.loss.summarize`'s; a row of ``metrics.csv``."""
        result = {which: self.validator(self.weights(which)) for which in ("ema", "raw")}
        if distributed.is_main_process():
            final, other = self.metrics.final, other_weights(self.metrics.final)
            nan = float("nan")
            self.metrics.append(dict(
                step=self.step, epoch=self.position["epoch"], lr=float(self.schedule(max(self.step - 1, 0))),
                loss=loss_value, skipped_steps=int(self.state.skipped),
                elapsed_s=round(time.time() - self.start_time, 1),
                **{k: result[final].get(k, nan) for k in ERRORS},
                **{f"{other}_{k}": result[other].get(k, nan) for k in ERRORS}))
        return result

    # --- steps

    def batches(self):
        """``(frame indices, global batch)`` of every step from the current position on, epoch after epoch.
        Time spent waiting for the host pipeline goes to the progress bar."""
        t, m = self.config.training, self.config.model
        while True:
            steps = epoch_steps(self.train.n_atoms, t.batch_atoms, self.sub_batches, t.seed, self.position["epoch"],
                                start=self.position["batch"])
            specs = self.batcher.specs(steps, self.local)
            with contextlib.closing(device_batches(self.train, specs, self.mesh, m.type_map, m.rcut,
                                                   self.config.data.workers)) as built:
                for frames in steps:
                    waited = time.perf_counter()
                    batch = next(built)
                    self.progress.host_wait_s += time.perf_counter() - waited
                    yield frames, batch
            self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}

    def take_step(self, frames, batch) -> dict:
        self.state, metrics = self.step_fn(self.state, self.stats, batch)  # returns at once (async dispatch)
        self.step += 1
        self.position["batch"] += self.sub_batches
        self.recent.append((self.step, frames))
        self.progress.structures += sum(len(f) for f in frames)
        return metrics

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

    def run(self, stop_after: int | None, progress: bool) -> dict:
        """Steps until ``training.steps`` (or ``stop_after`` steps of this call, or a stop signal); returns the
        final validation errors of the saved model's weights."""
        t = self.config.training
        result = self.validate(float("nan")) if self.step == 0 else {}  # the start of the learning curve
        self.progress = _Progress(t.steps, self.step, progress and distributed.is_main_process())
        with _StopRequest() as stop, contextlib.closing(self.batches()) as stream:
            for this_call, (frames, batch) in enumerate(stream if self.step < t.steps else (), 1):
                metrics = self.take_step(frames, batch)
                step = self.step
                if step % LOG_EVERY == 0 or step == t.steps:
                    loss_value = float(metrics["loss"])  # waits for the step
                    self.check_finite()
                    self.progress.show(loss_value, result)
                self.progress.bar.update(1)
                if step % t.validate_every == 0 or step == t.steps:
                    result = self.validate(float(metrics["loss"]))
                    log.info("step %d: %s", step, "; ".join(
                        f"{w}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()) for w, r in result.items()))
                last = step == t.steps or (stop_after is not None and this_call >= stop_after) or stop.requested
                if step % t.checkpoint_every == 0 or last:
                    self.check_finite()
                    self.save()
                if last:
                    break
        self.progress.bar.close()
        log.info("%d compilation(s) of the training step; %.1f%% of padded edge slots unused",
                 self.step_fn._cache_size(), 100 * self.batcher.padding_waste)
        return result.get(t.final_weights, {})


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
    validation metrics of the saved model's weights (``training.final_weights``).

    ``stop_after`` stops (with a checkpoint) after that many steps of this call, as a kill would.
    """
    distributed.initialize()
    workdir = Path(workdir)
    if distributed.is_main_process():
        _claim_workdir(workdir, config_text)
    train, val = read_data(config, base, workdir)
    log.info("%d training and %d validation frames", len(train), len(val))
    trainer = Trainer(config, workdir, distributed.data_mesh(devices), train, val)
    result = trainer.run(stop_after, progress)
    if trainer.step >= config.training.steps and distributed.is_main_process():
        final = config.training.final_weights
        checkpoint.save_model(workdir, distributed.to_host(trainer.weights(final)), config_text)
        log.info("saved the %s weights as the model (training.final_weights) in %s", final,
                 workdir / checkpoint.MODEL)
        trainer.metrics.plot(workdir / "learning_curve.png")
    return result
