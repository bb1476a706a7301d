"""One loader for every trained model: ``load_model(source) -> TrainedModel(config, variables, dtype)``.

``source`` is any of

- a ``train.py`` work directory: its final model (``model/``), or, if the run has not finished, its newest
  checkpoint (EMA weights unless ``ema=False``);
- a saved model directory (``variables.msgpack`` + ``config.yaml``, what ``model/`` holds);
- a DeePMD-kit 3.2.0 DPA4 model: a ``model.serialize()`` dict, a ``.dp``/``.yaml``/``.yml`` model file or a
  ``.pt`` checkpoint (``head``: the branch of a multi-task one), read by :mod:`dpa4_jax.convert`.

The calculator, fine-tuning, export and evaluation all load through it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from dpa4_jax import checkpoint, convert
from dpa4_jax.config import ModelConfig, from_dict


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model ready to evaluate: its configuration, ``{"params", "stats": {"energy_bias"}}`` (host arrays) and
    the dtype it was trained in ("float32" or "float64"; for a DeePMD-kit model, that of its weights)."""

    config: ModelConfig
    variables: dict
    dtype: str


def load_model(source: str | Path | dict, ema: bool = True, head: str | None = None) -> TrainedModel:
    """The model at ``source`` (see the module's docstring). Errors name the path."""
    if isinstance(source, dict):
        return _deepmd(source, head)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file or directory")
    if path.is_file():
        return _deepmd(path, head)
    if head is not None:
        raise convert.ConversionError(f"head={head!r}: only a DeePMD-kit .pt checkpoint holds a multi-task model")
    text, variables = checkpoint.load_trained(path, ema)
    data = yaml.safe_load(text) or {}
    config = from_dict(ModelConfig, data.get("model"), str(path / "config.yaml"), "model")
    return TrainedModel(config, variables, (data.get("training") or {}).get("dtype", "float32"))


def _deepmd(source, head) -> TrainedModel:
    config, variables = convert.from_deepmd(source, head)
    return TrainedModel(config, variables, convert.precision_of(variables["params"]))
