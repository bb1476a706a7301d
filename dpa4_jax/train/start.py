"""Where a run starts: its newest checkpoint, or fresh (random or pretrained weights and a fitted energy bias)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dpa4_jax import checkpoint
from dpa4_jax import graph as graphs
from dpa4_jax.config import Config
from dpa4_jax.data import fit_energy_bias
from dpa4_jax.train import distributed, finetune
from dpa4_jax.train.step import TrainState, init_state
from dpa4_jax.variables import DTYPES, init_variables

log = logging.getLogger(__name__)

BIAS_SAMPLE = 100_000  # frames sampled for the energy-bias fit of a large data set


@dataclasses.dataclass
class RunStart:
    """The state a run starts from (host arrays), its data position and, when resumed, its padded shapes."""

    state: TrainState
    stats: dict  # {"energy_bias": (ntypes,)}
    position: dict  # {"epoch": e, "batch": sub-batches of epoch e already taken}
    budgets: list[graphs.Budget] | None  # None: plan them from the data


def start_or_resume(config: Config, workdir: Path, tx, train) -> RunStart:
    """The newest readable checkpoint of ``workdir``, else a fresh start: random weights (``training.seed``)
    or those of ``training.init_model`` on the config's type map, and the energy bias that
    ``training.energy_bias`` asks for, fitted on ``train``."""
    t = config.training
    variables = init_variables(config.model, seed=t.seed, dtype=t.dtype)
    state = init_state(variables["params"], tx)
    found = checkpoint.restore_latest(workdir, distributed.to_host(state), variables["stats"])
    if found is not None:
        path, state, stats, meta = found
        log.info("resuming from %s (step %d)", path, int(state.step))
        return RunStart(state, stats, {"epoch": meta["epoch"], "batch": meta["batch"]},
                        [graphs.Budget(*b) for b in meta["budgets"]])
    seen = None
    if t.init_model:  # only at the start: a resumed fine-tuning run restores its own checkpoints
        variables, seen = finetune.pretrained_start(config, variables)
        state = init_state(variables["params"], tx)
    fixed = finetune.fixed_energy_bias(t.energy_bias, config.model.type_map,
                                       np.asarray(variables["stats"]["energy_bias"]), seen)
    bias = energy_bias(train, config.model.type_map, t.seed, fixed)
    return RunStart(state, {"energy_bias": jnp.asarray(bias, DTYPES[t.dtype])}, {"epoch": 0, "batch": 0}, None)


def energy_bias(source, type_map, seed: int, fixed: dict[int, float] | None = None) -> np.ndarray:
    """Per-element energies fitted on the frames (a random sample of ``BIAS_SAMPLE`` for large sets); the
    types in ``fixed`` keep their given values."""
    picked = np.arange(len(source))
    if len(picked) > BIAS_SAMPLE:
        picked = np.sort(np.random.default_rng(seed).choice(len(picked), BIAS_SAMPLE, replace=False))
    return fit_energy_bias((source.composition(int(i)) for i in picked), type_map, fixed=fixed)
