"""The optimizer, the training state and the jitted steps.

One ``jax.jit``-compiled step holds the whole second-order computation: energy,
forces and virial by ``jax.grad`` of the energy, the loss, its gradient in the
parameters, the HybridMuon update and the EMA of the weights.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpa4_jax import physics
from dpa4_jax.config import Config
from dpa4_jax.model import DPA4
from dpa4_jax.optim import hybrid_muon, wsd_schedule
from dpa4_jax.train import loss as losses


# Donated batch buffers alias no output (see make_train_step): JAX's notice about it is expected.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class TrainState(NamedTuple):
    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(config: Config) -> optax.Schedule:
    o = config.optimizer
    return wsd_schedule(o.lr, config.training.steps, warmup_steps=min(o.warmup_steps, config.training.steps - 1),
                        warmup_start_factor=o.warmup_start_factor, decay_ratio=o.decay_ratio,
                        decay_type=o.decay_type, lr_min=o.lr_min)


def optimizer(config: Config) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then HybridMuon (or AdamW) on the WSD schedule."""
    o = config.optimizer
    schedule = learning_rate(config)
    if o.type == "hybrid_muon":
        tx = hybrid_muon(schedule, momentum=o.momentum, adam_betas=o.adam_betas, weight_decay=o.weight_decay,
                         muon_mode=o.muon_mode, magma_lite=o.magma_lite)
    else:
        tx = optax.adamw(schedule, b1=o.adam_betas[0], b2=o.adam_betas[1], eps=1e-8, weight_decay=o.weight_decay)
    if config.training.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.training.grad_clip), tx)
    return tx


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    # The EMA starts as a copy: parameters and EMA are donated to the step, and must not share buffers.
    return TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params), tx.init(params))


@functools.lru_cache(maxsize=4)
def training_functions(config: Config):
    """``(model, optimizer, schedule, jitted step)`` of a config, cached so that runs of the same
    configuration in one process (a resumed run, tests) reuse the compiled step."""
    precision = jnp.bfloat16 if config.training.mixed_precision == "bf16" else None
    dtype = jnp.float64 if config.training.dtype == "float64" else jnp.float32
    model = DPA4(config.model, param_dtype=dtype, matmul_dtype=precision)
    tx = optimizer(config)
    return model, tx, learning_rate(config), make_train_step(model, tx, config)


def make_train_step(model, tx: optax.GradientTransformation, config: Config, jit: bool = True):
    """``step(state, stats, batch) -> (state, metrics)``; the state and the batch are donated."""
    ema_decay = config.training.ema_decay

    def loss_fn(params, stats, batch):
        out = physics.energy_forces_virial(model, {"params": params, "stats": stats}, batch)
        return losses.loss(out, batch, config.loss)

    def step(state: TrainState, stats, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, stats, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    # Donating the batch frees its device buffers as soon as the step starts (they alias no output,
    # hence JAX's "not usable" notice, silenced in the loop).
    return jax.jit(step, donate_argnums=(0, 2)) if jit else step


@functools.lru_cache(maxsize=8)
def make_eval_step(model):
    """``evaluate(variables, batch) -> error sums`` (accumulate with ``train.loss.error_sums`` keys)."""

    @jax.jit
    def evaluate(variables, batch):
        return losses.error_sums(physics.energy_forces_virial(model, variables, batch), batch)

    return evaluate
