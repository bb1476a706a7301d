"""DeePMD-kit 3.2.0 DPA4 ("SeZM") models to and from dpa4-jax: configuration and weights.

Import (``from_deepmd``) accepts the backend-neutral ``model.serialize()`` dict (a plain
model, or the ``linear`` composition that ``bridging_method: zbl`` expands to), DeePMD-kit's
own model files of it (``.dp`` HDF5, ``.yaml``/``.yml``) and PyTorch ``.pt`` training
checkpoints (when torch is importable; a multi-task one needs ``head=``). Parameter names in
dpa4-jax mirror the reference's, so the weights map one to one; options of the reference that
dpa4-jax does not implement are rejected by name.

Export (``to_deepmd``, ``save_deepmd``) writes a dpa4-jax model back as such a dict or file.
It needs DeePMD-kit installed: the dict is DeePMD-kit's own serialization of a freshly built
model of the same configuration with its weights replaced by ours, so the reference's derived
buffers (index tables, balance weights, versions) come from the reference itself instead of
a second copy of its layout rules that could drift from it; whoever runs the exported model in
DeePMD-kit has it installed anyway. From the command line::

    python -m dpa4_jax.convert RUN OUT.dp [--precision float32|float64]

``RUN`` is a ``train.py`` work directory (its final model, else its newest checkpoint's EMA
weights) or a saved model directory (``variables.msgpack`` + ``config.yaml``); ``OUT`` ends in
``.dp`` (HDF5) or ``.yaml``/``.yml``. Then ``dp convert-backend OUT.dp model.pt2`` gives the
PyTorch-Exportable model that LAMMPS's ``pair_style deepmd`` loads (see the README).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from dpa4_jax.config import ModelConfig
from dpa4_jax.convert.options import (
    FITTING_TYPES,
    ConversionError,
    check_model_options,
    deepmd_config,
    model_config,
)

log = logging.getLogger(__name__)

# Buffers of the reference that are derived from the configuration, not weights.
_DERIVED = re.compile(r"(expand_index|balance_weight|m0_idx|pos_indices|neg_indices|kernel_compact_index|"
                      r"kernel_dense_index|l1_perm|l1_sign_outer|version_tensor|^mean$|^stddev$|^gie\.)")
# Where dpa4-jax's module tree differs from the reference's.
_RENAMES = {"act/scalar_gate": "scalar_gate", "hidden_layers_0/linear": "hidden_layers_0"}


def _flax_path(name: str) -> tuple[str, ...]:
    """``blocks.0.so2_conv.so2_linears.1.weight_m.0`` -> ``(blocks_0, so2_conv, so2_linears_1, weight_m_0)``."""
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    path = "/".join(parts)
    for old, new in _RENAMES.items():
        path = path.replace(old, new)
    return tuple(path.split("/"))


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _weight_paths(descriptor_vars: dict, fitting_vars: dict):
    """``(store, name, flax path)`` of every weight among the reference's descriptor and fitting
    variables: the one naming rule, read by the import and the export alike."""
    for store, root in ((descriptor_vars, ()), (fitting_vars, ("fitting",))):
        for name, value in store.items():
            if value is not None and not _DERIVED.search(name):
                yield store, name, root + _flax_path(name)


def _variables_from_names(descriptor_vars: dict, fitting_vars: dict, energy_bias: np.ndarray) -> dict:
    params: dict = {}
    for store, name, path in _weight_paths(descriptor_vars, fitting_vars):
        _set(params, path, np.asarray(store[name]))
    return {"params": params, "stats": {"energy_bias": np.asarray(energy_bias, dtype=np.float64).reshape(-1)}}


# Descriptor versions whose forward pass dpa4-jax implements (1.1: the degree-norm floor 0.25; 1.2: the spin
# gate's form, inactive without spin). Older ones compute another function; newer ones are unknown.
DESCRIPTOR_VERSIONS = (1.1, 1.2)
# State-dict names of LoRA adapters (DeePMD-kit's dpa4_nn/lora.py) and of the density head.
_LORA = re.compile(r"\.(A_by_l|B_by_l|A_m0|B_m0|A_m|B_m|lora_scaling)$")


def _check_version(version, where: str) -> None:
    if not DESCRIPTOR_VERSIONS[0] <= float(version) <= DESCRIPTOR_VERSIONS[-1]:
        raise ConversionError(f"{where}: descriptor version {version} is not supported (dpa4-jax implements the "
                              f"forward pass of versions {DESCRIPTOR_VERSIONS[0]}-{DESCRIPTOR_VERSIONS[-1]})")


def _bridging(params: dict, where: str) -> dict | None:
    """The ZBL bridging settings of a model's top-level ``bridging_method`` keys (None: no bridging)."""
    method = str(params.get("bridging_method", "none")).lower()
    if method == "zbl":
        return {"r_inner": params.get("bridging_r_inner", 0.5), "r_outer": params.get("bridging_r_outer", 0.8)}
    if method not in ("none", ""):
        raise ConversionError(f"{where}: bridging_method {params['bridging_method']!r} is not supported")
    return None


def from_serialized(data: dict) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a DeePMD-kit ``model.serialize()`` dict.

    Accepts the NumPy port's dicts (a standard model, or the ``linear`` composition
    that ``bridging_method: zbl`` expands to) and the PyTorch model's (type ``SeZM``
    wrapping an ``atomic_model``, with the bridging settings at the top level). Every
    model, descriptor and fitting key is read or refused (:mod:`dpa4_jax.convert.options`).
    """
    bridging, bias_owners = None, []
    if "atomic_model" in data:  # PyTorch SeZMModel
        check_model_options(data, "serialize()")
        bridging = _bridging(data, "serialize()")
        data = data["atomic_model"]
    elif data.get("type") == "linear":
        learned = [m for m in data["models"] if m.get("type") != "inner_potential"]
        inner = [m for m in data["models"] if m.get("type") == "inner_potential"]
        if len(learned) != 1 or len(inner) != 1 or str(inner[0].get("mode", "")).upper() != "ZBL":
            raise ConversionError("only a DPA4 model plus one ZBL inner potential is supported as a linear model")
        if data.get("weights", "sum") != "sum":
            raise ConversionError(f"linear model weights {data.get('weights')!r} are not supported")
        # The reference adds the out_bias of the composition and of each member (measured on its NumPy port).
        bridging, bias_owners = inner[0], [data, inner[0]]
        data = learned[0]
    check_model_options(data, "serialize()")
    descriptor, fitting = data["descriptor"], data["fitting"]
    if str(descriptor.get("type", "")).lower() not in ("sezm", "dpa4"):
        raise ConversionError(f"descriptor type {descriptor.get('type')!r} is not DPA4/SeZM")
    _check_version(descriptor.get("@version", 1.0), "serialize()")
    config = model_config(descriptor["config"], fitting, bridging)
    if bridging is None and descriptor["config"].get("inner_clamp_r_inner") is not None:
        raise ConversionError("descriptor has an inner clamp but the model has no ZBL inner potential")
    networks = fitting["nets"]["networks"]
    if len(networks) != 1:
        raise ConversionError("only mixed-type fitting (one network) is supported")
    if networks[0].get("bias_out"):
        raise ConversionError("fitting network option bias_out=True is not supported (dpa4-jax has no output bias)")
    bias = np.asarray(fitting["@variables"]["bias_atom_e"]).reshape(-1)
    for owner in [data, *bias_owners]:
        out_bias = owner.get("@variables", {}).get("out_bias")
        if out_bias is not None:
            bias = bias + np.asarray(out_bias).reshape(-1)
    return config, _variables_from_names(descriptor["@variables"], networks[0]["@variables"], bias)


def from_checkpoint(path: str | Path, head: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a DeePMD-kit PyTorch ``.pt`` checkpoint (needs torch)."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading a .pt checkpoint needs torch; export it with "
                              "`model.serialize()` instead") from e
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    arrays = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in state.items()}
    return from_state_dict(arrays, str(path), head)


def _choose_head(params: dict, where: str, head: str | None) -> tuple[dict, str | None]:
    """The model parameters of ``head`` of a multi-task model (DeePMD-kit's ``model_dict``) and its
    state-dict prefix; for a single-task model its own parameters and None."""
    heads = params.get("model_dict")
    if heads is None:
        if head is not None:
            raise ConversionError(f"{where}: head={head!r} was given but the model is single-task")
        return params, None
    if head not in heads:
        choice = "choose one with head=..." if head is None else f"it has no head {head!r}"
        raise ConversionError(f"{where}: a multi-task model with heads {', '.join(heads)}; {choice}")
    return heads[head], f"model.{head}."


def from_state_dict(state: dict, where: str = "state dict", head: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a DeePMD-kit PyTorch training state dict (names -> NumPy arrays,
    and ``_extra_state``); ``head`` chooses the branch of a multi-task model."""
    params = state.get("_extra_state", {}).get("model_params")
    if params is None:
        raise ConversionError(f"{where}: no model_params in the checkpoint's _extra_state")
    params, prefix = _choose_head(params, where, head)
    tensors = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    found = [k.split("atomic_model.")[0] for k in tensors if "atomic_model.descriptor." in k]
    prefix = prefix if prefix in found else None if prefix else next(iter(found), None)
    if prefix is None:
        raise ConversionError(f"{where}: no DPA4 descriptor weights found" + (f" for head {head!r}" if head else ""))
    start = prefix + "atomic_model."
    check_model_options(params, where)
    _check_state_names(tensors, start, where)
    version = tensors.get(start + "descriptor.version_tensor")
    _check_version(1.0 if version is None else float(np.asarray(version)), where)  # absent: written before 1.1
    descriptor_vars = {k[len(start + "descriptor."):]: v for k, v in tensors.items() if k.startswith(start + "descriptor.")}
    fit_start = start + "fitting_net.filter_layers.networks.0."
    fitting_vars = {k[len(fit_start):]: v for k, v in tensors.items() if k.startswith(fit_start)}
    bias = tensors.get(start + "fitting_net.bias_atom_e", 0.0) + tensors.get(start + "out_bias", 0.0)
    descriptor = params.get("descriptor", {})
    if str(descriptor.get("type", "dpa4")).lower() not in ("sezm", "dpa4"):
        raise ConversionError(f"{where}: descriptor type {descriptor.get('type')!r} is not DPA4/SeZM")
    if str(params.get("fitting_net", {}).get("type", FITTING_TYPES[0])) not in FITTING_TYPES:
        raise ConversionError(f"{where}: fitting type {params['fitting_net']['type']!r} is not DPA4's energy "
                              f"fitting ({', '.join(FITTING_TYPES)})")
    config = model_config(dict(descriptor, type_map=params["type_map"]), params.get("fitting_net"),
                          _bridging(params, where))
    return config, _variables_from_names(descriptor_vars, fitting_vars, np.asarray(bias).reshape(-1))


def _check_state_names(tensors: dict, start: str, where: str) -> None:
    """LoRA adapters and a density head in a state dict are refused by name."""
    lora = sorted(k[len(start):] for k in tensors if k.startswith(start) and _LORA.search(k))
    if lora:
        raise ConversionError(f"{where}: LoRA adapters ({', '.join(lora[:3])}{', ...' if len(lora) > 3 else ''}) are "
                              "not supported: merge them into the base weights with DeePMD-kit first "
                              "(its merged-model export) and convert that")
    dens = sorted(k[len(start):] for k in tensors if k.startswith(start + "dens_fitting_net."))
    if dens:
        raise ConversionError(f"{where}: a density (DeNS) fitting head ({dens[0]}, ...) is not supported: dpa4-jax "
                              "has the energy head only")


def from_deepmd(source: str | Path | dict, head: str | None = None) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a ``model.serialize()`` dict, a DeePMD-kit model file of one
    (``.dp``, ``.yaml``, ``.yml``; needs DeePMD-kit) or a ``.pt`` checkpoint (``head``: the branch
    of a multi-task one)."""
    if head is not None and (isinstance(source, dict) or Path(source).suffix not in (".pt", ".pth")):
        raise ConversionError(f"head={head!r}: only a .pt checkpoint holds a multi-task model")
    if isinstance(source, dict):
        return from_serialized(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DeePMD-kit model file")
    if path.suffix in (".pt", ".pth"):
        return from_checkpoint(path, head)
    if path.suffix in DP_SUFFIXES:
        _require_deepmd(f"reading {path}")
        from deepmd.dpmodel.utils.serialization import load_dp_model

        content = load_dp_model(str(path))
        if "model" not in content:
            raise ConversionError(f"{path}: no 'model' entry (not a DeePMD-kit model file)")
        return from_serialized(content["model"])
    raise ConversionError(f"{path}: unsupported model file (expected .pt, {', '.join(DP_SUFFIXES)} or a "
                          "serialize() dict)")


# ----------------------------------------------------------------------------- export

DEEPMD_VERSION = "3.2.0"
DP_SUFFIXES = (".dp", ".yaml", ".yml")  # DeePMD-kit's own model files (deepmd.dpmodel.utils.serialization)


def _require_deepmd(purpose: str) -> None:
    try:
        import deepmd
    except ImportError as e:
        raise ImportError(f"{purpose} needs DeePMD-kit: pip install deepmd-kit=={DEEPMD_VERSION}") from e
    if deepmd.__version__ != DEEPMD_VERSION:
        log.warning("DeePMD-kit %s is installed; dpa4-jax converts to and from %s", deepmd.__version__, DEEPMD_VERSION)


def precision_of(params: dict) -> str:
    """"float64" when any weight is float64, else "float32"."""
    leaves = [np.asarray(x) for x in flatten_dict(params).values()]
    return "float64" if any(x.dtype == np.float64 for x in leaves) else "float32"


def _fill_weights(learned: dict, params: dict) -> None:
    """Replace, in place, the weights of the reference's DPA4 model ``learned`` by ``params``."""
    ours = flatten_dict(params)
    network = learned["fitting"]["nets"]["networks"][0]
    for store, name, path in _weight_paths(learned["descriptor"]["@variables"], network["@variables"]):
        if path not in ours:
            raise ConversionError(f"DeePMD-kit variable {name} has no dpa4-jax weight {'/'.join(path)}")
        value = np.asarray(ours.pop(path))
        if value.shape != store[name].shape:
            raise ConversionError(f"{'/'.join(path)}: shape {value.shape}, but DeePMD-kit's {name} has "
                                  f"{store[name].shape}")
        store[name] = value.astype(store[name].dtype)
    if ours:
        raise ConversionError(f"dpa4-jax weights with no DeePMD-kit variable: {', '.join('/'.join(p) for p in ours)}")


def _fill_energy_bias(data: dict, learned: dict, energy_bias: np.ndarray) -> None:
    """The whole bias in the top model's ``out_bias`` (per type); every other bias of the reference zero."""
    for owner in [data, *data.get("models", [])]:
        owner["@variables"]["out_bias"] = np.zeros_like(owner["@variables"]["out_bias"])
    fitting_bias = learned["fitting"]["@variables"]
    fitting_bias["bias_atom_e"] = np.zeros_like(fitting_bias["bias_atom_e"])
    out_bias = data["@variables"]["out_bias"]  # (1, ntypes, 1): one output, energy
    if energy_bias.size != out_bias.shape[1]:
        raise ConversionError(f"energy_bias has {energy_bias.size} entries for {out_bias.shape[1]} elements")
    data["@variables"]["out_bias"] = energy_bias.reshape(out_bias.shape).astype(out_bias.dtype)


def _build(config: ModelConfig, variables: dict, precision: str | None) -> tuple[dict, dict]:
    """``(serialize() dict, normalised model section)``: a fresh DeePMD-kit model of ``config`` with our weights."""
    _require_deepmd("exporting to DeePMD-kit")
    from deepmd.dpmodel.model.model import get_model
    from deepmd.utils.argcheck import model_args

    precision = precision or precision_of(variables["params"])
    section = model_args().normalize_value(deepmd_config(config, precision), trim_pattern="_*")
    data = get_model(copy.deepcopy(section)).serialize()
    # The reference's own reading of what it built must be this model (a guard for options added later).
    resolved = dataclasses.replace(config, radial_hidden=config.radial_hidden or config.channels,
                                   fitting_neurons=config.hidden_fitting)
    back = from_serialized(data)[0]
    if back != resolved:
        diff = {f.name: (getattr(resolved, f.name), getattr(back, f.name)) for f in dataclasses.fields(ModelConfig)
                if getattr(resolved, f.name) != getattr(back, f.name)}
        raise ConversionError(f"the DeePMD-kit model reads back as another configuration (ours, read back): {diff}")
    learned = data["models"][0] if data.get("type") == "linear" else data
    _fill_weights(learned, variables["params"])
    bias = variables.get("stats", {}).get("energy_bias", np.zeros(config.ntypes))
    _fill_energy_bias(data, learned, np.asarray(bias, dtype=np.float64).reshape(-1))
    return data, section


def to_deepmd(config: ModelConfig, variables: dict, precision: str | None = None) -> dict:
    """A DeePMD-kit 3.2.0 ``model.serialize()`` dict of a dpa4-jax model (needs DeePMD-kit).

    Args:
      config, variables: the model (``{"params", "stats": {"energy_bias"}}``).
      precision: "float32" or "float64" (default: the weights' dtype).

    A ZBL-bridged model becomes the reference's ``linear`` composition of the DPA4 model and a ZBL
    inner potential. The energy bias goes to the top model's ``out_bias`` and the fitting's
    ``bias_atom_e`` is zero, so ``from_serialized`` reads the same total back.
    """
    return _build(config, variables, precision)[0]


def save_deepmd(config: ModelConfig, variables: dict, path: str | Path, precision: str | None = None) -> Path:
    """Write the model as a DeePMD-kit model file: ``.dp`` (HDF5) or ``.yaml``/``.yml`` (needs DeePMD-kit)."""
    path = Path(path)
    if path.suffix not in DP_SUFFIXES:
        raise ValueError(f"{path}: a DeePMD-kit model file ends in {', '.join(DP_SUFFIXES)}")
    data, section = _build(config, variables, precision)
    from deepmd.dpmodel.utils.serialization import save_dp_model

    # model_def_script: the training input's model section, which DeePMD-kit's tools carry along.
    save_dp_model(str(path), {"model": data, "model_def_script": section})
    return path
