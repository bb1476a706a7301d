"""dpa4-jax: the DPA4 machine-learning interatomic potential in JAX/Flax."""

from dpa4_jax.config import ModelConfig
from dpa4_jax.model import DPA4

__all__ = ["DPA4", "ModelConfig", "DPA4Calculator"]


def __getattr__(name):
    # The ASE calculator pulls in ASE and the neighbour list; import it on first use.
    if name == "DPA4Calculator":
        from dpa4_jax.calculator import DPA4Calculator

        return DPA4Calculator
    raise AttributeError(name)
