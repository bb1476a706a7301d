"""dpa4-jax: the DPA4 machine-learning interatomic potential in JAX/Flax."""

from dpa4_jax.config import ModelConfig

__all__ = ["DPA4", "ModelConfig", "DPA4Calculator"]


def __getattr__(name):
    # The model (Flax) and the ASE calculator are imported on first use: the host pipeline's worker processes
    # import this package and need neither.
    if name == "DPA4":
        from dpa4_jax.model import DPA4

        return DPA4
    if name == "DPA4Calculator":
        from dpa4_jax.calculator import DPA4Calculator

        return DPA4Calculator
    raise AttributeError(name)
