"""The optimizer, the training state and the jitted, data-parallel steps.

One ``jax.jit``-compiled step holds the whole second-order computation: energy,
forces and virial by ``jax.grad`` of the energy, the loss, its gradient in the
parameters, the HybridMuon update and the EMA of the weights. Inside it a
``shard_map`` over the mesh's ``"data"`` axis gives each device its own
sub-batches; one ``psum`` adds their gradients, and the (replicated) update
follows.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpa4_jax import physics
from dpa4_jax.config import Config, LossConfig, ModelConfig, OptimizerConfig
from dpa4_jax.model import DPA4
from dpa4_jax.optim import hybrid_muon, wsd_schedule
from dpa4_jax.train import freeze
from dpa4_jax.train import loss as losses
from dpa4_jax.train.distributed import AXIS
from dpa4_jax.variables import DTYPES

# Donated batch buffers alias no output (see make_train_step): JAX's notice about it is expected.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class TrainState(NamedTuple):
    step: jnp.ndarray  # steps taken (global batches consumed)
    params: Any
    ema_params: Any
    opt_state: Any
    skipped: jnp.ndarray  # steps whose loss or gradient was not finite: their update was skipped
    last_skipped: jnp.ndarray  # the latest such step (0: none)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything the compiled training step depends on, and nothing else: the model, optimizer and loss
    sections and the training fields the step reads. Runs whose settings are equal (a resumed run, tests)
    share one compiled step, whatever their data, seeds, batch plans, checkpoints or validation."""

    model: ModelConfig
    optimizer: OptimizerConfig
    loss: LossConfig
    steps: int  # the schedule's length
    dtype: str
    mixed_precision: str
    ema_decay: float
    grad_clip: float
    freeze: tuple[str, ...]

    @classmethod
    def of(cls, config: Config) -> StepSettings:
        t = config.training
        return cls(config.model, config.optimizer, config.loss, t.steps, t.dtype, t.mixed_precision, t.ema_decay,
                   t.grad_clip, t.freeze)


def learning_rate(settings: StepSettings) -> optax.Schedule:
    o = settings.optimizer
    return wsd_schedule(o.lr, settings.steps, warmup_steps=min(o.warmup_steps, settings.steps - 1),
                        warmup_start_factor=o.warmup_start_factor, decay_ratio=o.decay_ratio,
                        decay_type=o.decay_type, lr_min=o.lr_min)


def optimizer(settings: StepSettings) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then HybridMuon (or AdamW) on the WSD schedule, on the parameters
    that ``training.freeze`` does not freeze."""
    o = settings.optimizer
    schedule = learning_rate(settings)
    if o.type == "hybrid_muon":
        tx = hybrid_muon(schedule, momentum=o.momentum, adam_betas=o.adam_betas, weight_decay=o.weight_decay,
                         muon_mode=o.muon_mode, magma_lite=o.magma_lite)
    else:
        tx = optax.adamw(schedule, b1=o.adam_betas[0], b2=o.adam_betas[1], eps=1e-8, weight_decay=o.weight_decay)
    if settings.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(settings.grad_clip), tx)
    return freeze.without_frozen(tx, settings.freeze)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    # The EMA starts as a copy: parameters and EMA are donated to the step, and must not share buffers.
    def zero():  # a buffer of its own each: all fields are donated
        return jnp.zeros((), jnp.int32)

    return TrainState(zero(), params, jax.tree.map(jnp.copy, params), tx.init(params), zero(), zero())


def training_functions(config: Config, mesh: Mesh):
    """``(model, optimizer, schedule, jitted step)`` of a config on a mesh, cached by its
    :class:`StepSettings` so that runs of the same settings in one process reuse the compiled step."""
    return _training_functions(StepSettings.of(config), mesh)


@functools.lru_cache(maxsize=4)
def _training_functions(settings: StepSettings, mesh: Mesh):
    precision = jnp.bfloat16 if settings.mixed_precision == "bf16" else None
    model = DPA4(settings.model, param_dtype=DTYPES[settings.dtype], matmul_dtype=precision)
    tx = optimizer(settings)
    return model, tx, learning_rate(settings), make_train_step(model, tx, settings, mesh)


def _over_sub_batches(fn, batch, zeros):
    """``sum_g fn(batch[g])`` over the leading axis of this device's sub-batches, one at a time (``lax.scan``:
    memory of one sub-batch, not of all)."""
    def add(total, sub):
        return jax.tree.map(jnp.add, total, fn(sub)), None

    return jax.lax.scan(add, zeros, batch)[0]


def edge_rolls(step: jnp.ndarray, sub_batch: jnp.ndarray, n_edge: int, dtype) -> jnp.ndarray:
    """``(E,)`` random rolls of the edge frames (``random_gamma``), uniform in [0, 2 pi), drawn afresh for
    every step and sub-batch (its index in the global batch) from ``fold_in``s of a fixed key: a resumed run,
    or one on another number of devices, draws the same rolls."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), step), sub_batch)
    return jax.random.uniform(key, (n_edge,), dtype, 0.0, 2.0 * jnp.pi)


def make_loss_and_grad(model, settings: StepSettings, mesh: Mesh):
    """``(params, stats, batch, step) -> (loss, error sums, gradient)`` of a global batch (leaves ``(G, ...)``,
    split over the mesh): each device handles its ``G / n_devices`` sub-batches, then one all-reduce (``psum``).
    ``step`` (steps taken) seeds the random edge-frame rolls of ``model.random_gamma``."""

    def sub_batch_loss(params, stats, sub, index, step, counts):
        params = freeze.stop_frozen(params, settings.freeze)
        rolls = settings.model.random_gamma
        gamma = edge_rolls(step, index, sub.senders.shape[0], model.param_dtype) if rolls else None
        out = physics.energy_forces_virial(model, {"params": params, "stats": stats}, sub, edge_gamma=gamma)
        return losses.loss(out, sub, settings.loss, counts)

    def on_device(params, stats, batch, step):
        # The loss divides by the label counts of the whole global batch, so the sub-batch losses (and
        # their gradients) add up to those of the global batch, whatever the number of devices.
        counts = jax.lax.psum(jax.tree.map(lambda c: c.sum(0), jax.vmap(losses.label_counts)(batch)), AXIS)
        grad_fn = jax.value_and_grad(sub_batch_loss, has_aux=True)

        def value_and_grad(sub_and_index):
            return grad_fn(params, stats, *sub_and_index, step, counts)

        n_local = jax.tree.leaves(batch)[0].shape[0]
        indices = jax.lax.axis_index(AXIS) * n_local + jnp.arange(n_local)  # places in the global batch
        first = jax.tree.map(lambda x: x[0], (batch, indices))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(value_and_grad, first))
        (value, sums), grads = _over_sub_batches(value_and_grad, (batch, indices), zeros)
        return jax.lax.psum((value, sums, grads), AXIS)

    # check_vma=False: inside, gradients with respect to the replicated parameters are per-device
    # partial sums, and the explicit psum above is the one reduction.
    return jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()), out_specs=P(), check_vma=False)


def make_train_step(model, tx: optax.GradientTransformation, settings: StepSettings, mesh: Mesh, jit: bool = True):
    """``step(state, stats, batch) -> (state, metrics)``; the state and the batch are donated.

    A step whose loss or gradient is not finite changes nothing but ``state.step``, ``skipped`` and
    ``last_skipped`` (the loop decides whether to go on). The leaves that ``training.freeze`` names are
    copied unchanged into the new parameters and EMA (``train.freeze``).
    """
    ema_decay, frozen = settings.ema_decay, settings.freeze
    loss_and_grad = make_loss_and_grad(model, settings, mesh)

    def step(state: TrainState, stats, batch):
        value, sums, grads = loss_and_grad(state.params, stats, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = freeze.keep_frozen(optax.apply_updates(state.params, updates), state.params, frozen)
        ema = freeze.keep_frozen(jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params),
                                 state.ema_params, frozen)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)

        def unless_bad(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        taken = state.step + 1
        new = TrainState(taken, unless_bad(params, state.params), unless_bad(ema, state.ema_params),
                         unless_bad(opt_state, state.opt_state), state.skipped + (~finite).astype(jnp.int32),
                         jnp.where(finite, state.last_skipped, taken))
        return new, {"loss": value, "grad_norm": grad_norm, "finite": finite}

    # Donating the batch frees its device buffers as soon as the step starts (they alias no output,
    # hence JAX's "not usable" notice, silenced above).
    return jax.jit(step, donate_argnums=(0, 2)) if jit else step


@functools.lru_cache(maxsize=8)
def make_eval_step(model, mesh: Mesh):
    """``evaluate(variables, batch) -> error sums`` of a global batch (``train.loss.error_sums`` keys)."""

    def on_device(variables, batch):
        def sums(sub):
            return losses.error_sums(physics.energy_forces_virial(model, variables, sub), sub)

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(sums, jax.tree.map(lambda x: x[0], batch)))
        return jax.lax.psum(_over_sub_batches(sums, batch, zeros), AXIS)

    return jax.jit(jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))
