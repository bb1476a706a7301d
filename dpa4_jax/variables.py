"""A model's variables: the compute dtypes by name, random initialisation and shapes.

Every part of the package that builds a DPA4 (the calculator, training, fine-tuning, export) gets its
variables and dtypes here, beside the model, so none of them needs another's set-up code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpa4_jax.config import ModelConfig
from dpa4_jax.model import DPA4

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def compute_dtype(name: str):
    """The JAX dtype of ``"float32"`` or ``"float64"``; float64 switches JAX's 64-bit mode on (it must be on
    before any float64 array is created)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return DTYPES[name]


def _dimer(param_dtype):
    """``(species, vec, senders, receivers, edge_mask, edge_gamma, charge_spin)`` of a neutral singlet two-atom
    dimer: parameter shapes do not depend on the graph, so it is all that initialisation needs."""
    return (jnp.zeros((2,), jnp.int32), jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], param_dtype),
            jnp.array([1, 0]), jnp.array([0, 1]), jnp.ones((2,), bool), None, jnp.array([[0.0, 1.0]] * 2))


def init_variables(config: ModelConfig, seed: int = 0, dtype: str = "float32") -> dict:
    """Randomly initialised variables (``params`` and ``stats``) of a model."""
    param_dtype = compute_dtype(dtype)
    init = _jitted_init(DPA4(config, param_dtype=param_dtype))
    return init(jax.random.key(seed), *_dimer(param_dtype))


def variable_shapes(config: ModelConfig) -> dict:
    """The variables' shapes (``jax.ShapeDtypeStruct`` leaves), without computing them."""
    return jax.eval_shape(DPA4(config).init, jax.random.key(0), *_dimer(jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_init(model: DPA4):
    """One compiled ``init`` per model (a new ``jax.jit(model.init)`` would compile again every call)."""
    return jax.jit(model.init)
