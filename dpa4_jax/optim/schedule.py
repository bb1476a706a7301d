"""Warmup-stable-decay (WSD) learning rate as an optax schedule (paper S-2.2).

Behaviour of DeePMD-kit 3.2.0's ``LearningRateWSD`` (type ``"wsd"``) with the
warm-up of its ``BaseLR``, re-implemented for JAX. With T = ``total_steps``,
T_w the warm-up length and T_d the decay length (paper Eq. 71-73):

    lr(t) = a_w + (peak - a_w) * t / T_w        0 <= t < T_w
          = peak                                T_w <= t < T - T_d
          = decay(tau)                          T - T_d <= t < T
          = lr_min                              t >= T
    tau   = clip((t - (T - T_d)) / T_d, 0, 1),  a_w = warmup_start_factor * peak

Step indexing: ``t`` is the optax update count, 0 for the first update. The
reference trainer reads its schedule at the same index (its LambdaLR starts at
step 0), so the first update uses ``a_w`` and the update with count T_w is the
first at ``peak``.

[reference > paper] The paper leaves T_d implicit; the reference uses
``T_d = max(1, min(int(decay_ratio * T), T - T_w))``, ``T_w = int(warmup_ratio
* T)`` when a ratio is given, and offers two decay rules besides the paper's
cosine (Eq. 73): ``inverse_linear`` (its default) and ``linear``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

DECAY_TYPES = ("inverse_linear", "cosine", "linear")

# WSD settings of the paper's DPA4-Air Matbench run (Table S-17: max LR 6e-4
# (Neo 6.5e-4, Plus 5.5e-4, Pro 4.3e-4; SPICE, Table S-18: 5e-4), min LR 1e-6,
# 5000 warm-up steps, decay ratio 0.65, cosine). The tables do not give a warm-up start factor; the reference's
# default is 0.0 and its water example uses 0.2.
PAPER_WSD = dict(peak_lr=6e-4, lr_min=1e-6, warmup_steps=5000, decay_ratio=0.65, decay_type="cosine")


def wsd_phases(total_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None,
               decay_ratio: float = 0.1) -> tuple[int, int, int]:
    """(T_w, T_s, T_d): warm-up, stable and decay lengths in steps, as the reference derives them."""
    if warmup_steps and warmup_ratio is not None:
        raise ValueError("warmup_steps and warmup_ratio are mutually exclusive")
    if total_steps < 0:
        raise ValueError("total_steps must be non-negative")
    t_w = int(warmup_ratio * total_steps) if warmup_ratio is not None else int(warmup_steps or 0)
    if t_w < 0:
        raise ValueError("warmup_steps must be non-negative")
    if total_steps > 0 and t_w >= total_steps:
        raise ValueError("warmup_steps must be smaller than total_steps")
    if total_steps == 0 and t_w != 0:
        raise ValueError("warmup_steps must be 0 when total_steps is 0")
    if not 0.0 < decay_ratio <= 1.0:
        raise ValueError(f"decay_ratio ({decay_ratio}) must be in (0, 1]")
    after_warmup = total_steps - t_w
    t_d = max(1, min(int(decay_ratio * total_steps), after_warmup))
    return t_w, after_warmup - t_d, t_d


def wsd_schedule(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    warmup_start_factor: float = 0.0,
    decay_ratio: float = 0.1,
    decay_type: str = "inverse_linear",
    lr_min: float = 1e-6,
) -> optax.Schedule:
    """WSD schedule with the reference's defaults (``LearningRateWSD``).

    Args:
      peak_lr: stable-phase learning rate (reference ``start_lr``).
      total_steps: T, warm-up included (reference ``num_steps``).
      warmup_steps / warmup_ratio: T_w, or T_w = int(ratio * T); at most one.
      warmup_start_factor: warm-up starts at this fraction of ``peak_lr``.
      decay_ratio: decay phase length as a fraction of T (reference
        ``decay_phase_ratio``, default 0.1; the paper's runs use 0.65).
      decay_type: "inverse_linear" (reference default), "cosine" (paper Eq. 73)
        or "linear".
      lr_min: final learning rate (reference ``stop_lr``, which has no default;
        1e-6 is the value of every run in the paper).

    Returns:
      ``count -> lr``, jit-compatible; float32 unless x64 is enabled.
    """
    if not (peak_lr > 0 and math.isfinite(peak_lr)):
        raise ValueError(f"peak_lr ({peak_lr}) must be positive and finite")
    if lr_min <= 0:
        raise ValueError(f"lr_min ({lr_min}) must be positive")
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
    t_w, t_s, t_d = wsd_phases(total_steps, warmup_steps, warmup_ratio, decay_ratio)
    post_warmup = total_steps - t_w
    lr_w = warmup_start_factor * peak_lr

    def decay(tau):
        """Eq. 73 and the reference's two other rules; tau in [0, 1]."""
        if decay_type == "inverse_linear":
            return 1.0 / (tau / lr_min + (1.0 - tau) / peak_lr)
        if decay_type == "cosine":
            return lr_min + (peak_lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * tau))
        return peak_lr + (lr_min - peak_lr) * tau

    def schedule(count):
        t = jnp.asarray(count, dtype=jnp.result_type(float))
        # Step counted from the end of warm-up (never negative after it).
        s = jnp.maximum(t - t_w, 0.0) if t_w > 0 else t
        tau = jnp.clip((s - t_s) / t_d, 0.0, 1.0)
        lr = jnp.where(s < t_s, peak_lr, decay(tau))
        lr = jnp.where(s >= post_warmup, lr_min, lr)
        if t_w > 0:
            lr = jnp.where(t < t_w, lr_w + (peak_lr - lr_w) * t / t_w, lr)
        return lr

    return schedule
