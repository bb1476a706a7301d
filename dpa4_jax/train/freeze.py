"""Frozen parameters (``training.freeze``): no gradient, no optimizer state, no update, no EMA update.

A name is a top-level parameter (``type_embedding``, ``blocks_0``, ``fitting``, ...) or a path below one
with ``/`` (``blocks_0/so2_conv``); it freezes every leaf under it. A frozen leaf keeps its bits: the step
copies the old value rather than adding a zero update (``-0.0 + 0.0`` is ``+0.0``) or recomputing its EMA
(``d p + (1 - d) p`` is not ``p`` in floating point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import optax

from dpa4_jax.config import ConfigError

TRAINED, FROZEN = "trained", "frozen"


def _keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path)


def _check_name(params, name: str) -> None:
    """An unknown name is an error listing the valid names at the level where it stops matching."""
    node, done = params, []
    for part in name.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            where = "top-level parameter" if not done else f"entry under {'/'.join(done)}"
            valid = ", ".join(sorted(node)) if isinstance(node, Mapping) else "(none: a leaf)"
            raise ConfigError(f"training.freeze: {name!r}: no {where} {part!r}; valid: {valid}")
        node, done = node[part], done + [part]


def frozen_mask(params, names: Sequence[str]):
    """Pytree like ``params`` with True on the leaves under one of ``names`` (static Python bools)."""
    for name in names:
        _check_name(params, name)
    prefixes = [tuple(name.split("/")) for name in names]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(_keys(path)[:len(p)] == p for p in prefixes), params)


def without_frozen(tx: optax.GradientTransformation, names: Sequence[str]) -> optax.GradientTransformation:
    """``tx`` on the trained leaves only: frozen ones get a zero update and no optimizer state (Muon momentum,
    Adam moments), and no weight decay; gradient clipping inside ``tx`` sees only the trained gradients."""
    if not names:
        return tx
    labels = lambda params: jax.tree.map(lambda f: FROZEN if f else TRAINED, frozen_mask(params, names))
    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def stop_frozen(params, names: Sequence[str]):
    """``params`` with the gradient stopped at frozen leaves: the step does not compute their gradient."""
    if not names:
        return params
    return jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen_mask(params, names), params)


def keep_frozen(new, old, names: Sequence[str]):
    """``new`` with its frozen leaves replaced by those of ``old`` (bit for bit)."""
    if not names:
        return new
    return jax.tree.map(lambda f, n, o: o if f else n, frozen_mask(new, names), new, old)
