"""Fine-tuning: a run that starts from a pretrained model (``train.py --init-model PATH``).

The pretrained model fixes the architecture; the type map comes from the new config. In order:

1. ``load_init_model``: the pretrained model, read by :func:`dpa4_jax.load.load_model` (a dpa4-jax run
   directory or saved model, or a DeePMD-kit model).
2. ``adopt_init_model`` (train.py, on the config file's mapping): the model section becomes the pretrained
   one with the config's ``type_map`` and ``sel`` (the pretrained ones where the config has none); an
   architecture key the config sets to another value is an error naming it. The init model's absolute path
   is recorded as ``training.init_model``, so the config stored with the run names it.
3. ``pretrained_start`` (the trainer, when the run has no checkpoint yet): the pretrained variables on the
   new type map (``remap_types``). An element in both maps keeps its rows of every type-indexed table
   (type embeddings with their padding row, the env seed's type embedding, ``stats/energy_bias``); a new
   element gets the rows of the model's own fresh initialisation (``training.seed``).
4. ``fixed_energy_bias``: the per-element energies that ``training.energy_bias`` assigns; the trainer fits
   the others by least squares on the training data with these fixed.

A resumed run restores its own checkpoints and does not read the init model again (``train.loop``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from ase.data import chemical_symbols
from flax.traverse_util import flatten_dict, unflatten_dict

from dpa4_jax.config import Config, ConfigError, ModelConfig, from_dict
from dpa4_jax.convert import ConversionError
from dpa4_jax.load import TrainedModel, load_model
from dpa4_jax.variables import variable_shapes

log = logging.getLogger(__name__)

# Model keys that a fine-tuning config may set freely: the weights do not depend on them.
NOT_ARCHITECTURE = ("type_map", "sel", "random_gamma")  # random_gamma: a training-time augmentation


def load_init_model(source: str | Path) -> TrainedModel:
    """The pretrained model (:func:`dpa4_jax.load.load_model`: its EMA weights), errors as ``ConfigError``s
    naming the path."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"init model {path}: no such file or directory")
    try:
        return load_model(path)
    except (ConversionError, FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"init model {path}: {e}") from None


def _explicit(config: ModelConfig) -> ModelConfig:
    """``config`` with its automatic widths (0) replaced by the widths they stand for."""
    return dataclasses.replace(config, ffn_neurons=config.hidden_ffn, fitting_neurons=config.hidden_fitting,
                               radial_hidden=config.radial_hidden or config.channels)


def check_architecture(model: ModelConfig, pretrained: ModelConfig, where: str) -> None:
    """The architecture keys of ``model`` must equal the pretrained model's (all but ``NOT_ARCHITECTURE``;
    an automatic width equals the width it stands for)."""
    model, pretrained = _explicit(model), _explicit(pretrained)
    for field in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(model, field.name), getattr(pretrained, field.name)
        if field.name not in NOT_ARCHITECTURE and mine != theirs:
            raise ConfigError(f"{where}: model.{field.name} is {mine!r} but the init model has {theirs!r}; the "
                              f"architecture comes from the init model (drop the key or set it to {theirs!r})")


def adopt_init_model(data: dict, init_model: str | Path, where: str) -> dict:
    """A config file's mapping (changed in place) set up to fine-tune ``init_model``: see the module doc."""
    path = Path(init_model).expanduser().resolve()
    pretrained = load_init_model(path).config
    model = from_dict(ModelConfig, {**pretrained.to_dict(), **(data.get("model") or {})}, where, "model")
    check_architecture(model, pretrained, where)
    data["model"] = model.to_dict()
    data["training"] = {**(data.get("training") or {}), "init_model": str(path)}
    return data


@functools.lru_cache(maxsize=8)
def type_indexed(config: ModelConfig) -> dict[tuple[str, ...], int]:
    """The variables indexed by type, each with its number of rows after the types (1: a padding row).

    Found by their shapes, not their names: the leaves whose leading axis grows with one more type.
    """
    extra = next(s for s in chemical_symbols[1:] if s not in config.type_map)
    shapes = flatten_dict(variable_shapes(config))
    grown = flatten_dict(variable_shapes(dataclasses.replace(config, type_map=(*config.type_map, extra))))
    return {path: s.shape[0] - config.ntypes for path, s in shapes.items() if grown[path].shape != s.shape}


def remap_types(pretrained: dict, old_map, fresh: dict, new_map, indexed: dict) -> dict:
    """``pretrained`` variables on ``new_map``, in the dtypes of ``fresh`` (the new model's initialisation).

    Type-indexed leaves (``indexed``, from ``type_indexed``): rows of elements in both maps and the padding
    rows from ``pretrained``, rows of new elements from ``fresh``. Every other leaf from ``pretrained``.
    """
    old, new = flatten_dict(pretrained), flatten_dict(fresh)
    out = {}
    for path, init in new.items():
        name = "/".join(path)
        if path not in old:
            raise ConfigError(f"init model: has no variable {name} (another architecture?)")
        value = np.asarray(old[path])
        if path in indexed:
            rows = np.array(init, dtype=value.dtype)
            for i, element in enumerate(new_map):
                if element in old_map:
                    rows[i] = value[old_map.index(element)]
            rows[len(new_map):] = value[len(old_map):]  # the padding row(s)
            value = rows
        if value.shape != init.shape:
            raise ConfigError(f"init model: variable {name} has shape {value.shape}, the model needs {init.shape}")
        out[path] = jnp.asarray(value, init.dtype)
    return unflatten_dict(out)


def pretrained_start(config: Config, fresh: dict) -> tuple[dict, np.ndarray]:
    """``(variables, seen)``: the init model's variables on ``config.model.type_map`` (``fresh``: the new
    model's initialisation) and, per type, whether the init model knew the element."""
    source = config.training.init_model
    pretrained = load_init_model(source)
    check_architecture(config.model, pretrained.config, f"training.init_model {source}")
    old_map, new_map = list(pretrained.config.type_map), list(config.model.type_map)
    seen = np.array([element in old_map for element in new_map])
    log.info("fine-tuning %s; elements new to it (fresh initial rows): %s", source,
             [e for e, s in zip(new_map, seen) if not s] or "none")
    return remap_types(pretrained.variables, old_map, fresh, new_map, type_indexed(config.model)), seen


def fixed_energy_bias(setting, type_map, pretrained_bias=None, seen=None) -> dict[int, float]:
    """The per-type energies ``training.energy_bias`` assigns: none for "refit", the pretrained ones of the
    elements the init model knew for "keep", the given ones for a mapping."""
    if setting == "refit":
        return {}
    if setting == "keep":
        return {int(i): float(pretrained_bias[i]) for i in np.flatnonzero(seen)}
    given = dict(setting)
    unknown = sorted(set(given) - set(type_map))
    if unknown:
        raise ConfigError(f"training.energy_bias: {unknown} not in model.type_map {list(type_map)}")
    return {list(type_map).index(element): value for element, value in given.items()}
