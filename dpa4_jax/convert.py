"""Import DeePMD-kit 3.2.0 DPA4 ("SeZM") models: configuration and weights.

Accepts the backend-neutral ``model.serialize()`` dict (a plain model, or the
``linear`` composition that ``bridging_method: zbl`` expands to) and PyTorch
``.pt`` training checkpoints (when torch is importable). Parameter names in
dpa4-jax mirror the reference's, so the weights map one to one; options of the
reference that dpa4-jax does not implement are rejected by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dpa4_jax.config import ModelConfig

# Reference options that must keep these values (dpa4-jax implements only these settings).
_FIXED_OPTIONS = {
    "basis_type": "bessel", "use_env_seed": True, "edge_cartesian": False, "node_cartesian": "none",
    "so2_norm": False, "so2_attn_res": "none", "radial_so2_mode": "degree_channel", "focus_dim": 0,
    "layer_scale": False, "atten_f_mix": False, "atten_v_proj": False, "atten_o_proj": False,
    "sandwich_norm": [False, True, True, False], "full_attn_res": "none", "block_attn_res": "none",
    "node_wise_s2": False, "node_wise_so3": False, "message_node_s2": False, "readout_layers": 1,
    "activation_function": "silu", "glu_activation": True, "exclude_types": [], "extra_node_l": 0,
    "add_chg_spin_ebd": False, "use_spin": None,
}
# Options that matter only when the branch they configure is on: (key, index or None, value dpa4-jax implements,
# when that branch is on). The node-wise grid path and the S2 activation of the SO(2) stack (s2_activation[0],
# lebedev_quadrature[0]) are always off (fixed above), so grid_mlp[0], grid_branch[0], lebedev_quadrature[0]
# never matter; the FFN's S2 grid settings do not with ffn_so3_grid.
_S2_FFN_OPTIONS = (("s2_activation", 1, True), ("lebedev_quadrature", 1, True))
# Buffers of the reference that are derived from the configuration, not weights.
_DERIVED = re.compile(r"(expand_index|balance_weight|m0_idx|pos_indices|neg_indices|kernel_compact_index|"
                      r"kernel_dense_index|l1_perm|l1_sign_outer|version_tensor|^mean$|^stddev$|^gie\.)")
# Where dpa4-jax's module tree differs from the reference's.
_RENAMES = {"act/scalar_gate": "scalar_gate", "hidden_layers_0/linear": "hidden_layers_0"}


class ConversionError(ValueError):
    """The reference model uses something dpa4-jax does not implement."""


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


# Options the reference accepts either as one value or as a per-branch list.
_BROADCAST = {"grid_mlp": 3, "grid_branch": 3, "lebedev_quadrature": 2}


def model_config(descriptor: dict, fitting: dict | None = None, bridging: dict | None = None) -> ModelConfig:
    """A ``ModelConfig`` from the reference's descriptor config (and fitting, bridging settings)."""
    c = dict(descriptor)
    for key, n in _BROADCAST.items():
        if key in c and not isinstance(c[key], list):
            c[key] = [c[key]] * n
    for key, expected in _FIXED_OPTIONS.items():
        if key in c and c[key] != expected and not (key == "exclude_types" and not c[key]):
            raise ConversionError(f"descriptor option {key}={c[key]!r} is not supported (dpa4-jax implements {expected!r})")
    if list(c.get("s2_activation", [False, True]))[0]:
        raise ConversionError("descriptor option s2_activation[0]=True (an S2 grid in the SO(2) stack) is not supported")
    if not c.get("ffn_so3_grid", False):
        for key, index, expected in _S2_FFN_OPTIONS:
            if key in c and c[key][index] != expected:
                raise ConversionError(f"descriptor option {key}[{index}]={c[key][index]!r} is not supported "
                                      f"(dpa4-jax implements {expected!r} for the FFN's S2 grid)")
    for key in ("l_schedule", "m_schedule"):
        if c.get(key) and len(set(c[key])) > 1:
            raise ConversionError(f"descriptor option {key}={c[key]} (a varying schedule) is not supported")
    radial_mlp = c.get("radial_mlp") or [0]
    if len(radial_mlp) != 1:
        raise ConversionError(f"descriptor option radial_mlp={radial_mlp}: only one hidden layer is supported")
    neuron = (fitting or {}).get("neuron") or [0]
    if len(neuron) != 1:
        raise ConversionError(f"fitting neuron={neuron}: only one GLU layer is supported")
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd"):
        if (fitting or {}).get(key):
            raise ConversionError(f"fitting option {key}={fitting[key]} is not supported")
    sel = c.get("sel", 384)
    kwargs: dict[str, Any] = dict(
        type_map=tuple(c["type_map"]), rcut=float(c.get("rcut", 6.0)), channels=int(c.get("channels", 64)),
        n_radial=int(c.get("n_radial", 16)), lmax=int(c.get("lmax", 3)), mmax=int(c.get("mmax", 1)),
        n_blocks=int(c.get("n_blocks", 3)), mixing_layers=int(c.get("so2_layers") or c.get("mixing_layers", 4)),
        n_focus=int(c.get("n_focus", 1)), radial_so2_rank=int(c.get("radial_so2_rank", 1)),
        n_atten_head=int(c.get("n_atten_head", 1)), ffn_blocks=int(c.get("ffn_blocks", 1)),
        ffn_neurons=int(c.get("ffn_neurons", 0)), fitting_neurons=int(neuron[0]),
        radial_hidden=int(radial_mlp[0]), env_exp=tuple(c.get("env_exp", (7, 5))),
        edge_norm=bool(c.get("edge_norm", True)), eps=float(c.get("eps", 1e-7)),
        sel=int(sum(sel) if isinstance(sel, list) else sel), mlp_bias=bool(c.get("mlp_bias", False)),
        ffn_so3_grid=bool(c.get("ffn_so3_grid", False)), message_node_so3=bool(c.get("message_node_so3", False)),
        so3_readout=str(c.get("so3_readout", "none")).lower(), kmax=int(c.get("kmax", 1)),
        grid_mlp=(False, *map(bool, c.get("grid_mlp", [False] * 3)[1:])),  # entry 0: node-wise, always off
        grid_branch=(0, *map(int, c.get("grid_branch", [0] * 3)[1:])),
        random_gamma=bool(c.get("random_gamma", True)),
    )
    r_in, r_out = c.get("inner_clamp_r_inner"), c.get("inner_clamp_r_outer")
    if bridging is not None:
        r_in, r_out = bridging.get("r_inner", r_in), bridging.get("r_outer", r_out)
    if r_in is not None and r_out is not None:
        kwargs.update(bridging="zbl", bridging_r_inner=float(r_in), bridging_r_outer=float(r_out))
    return ModelConfig(**kwargs)


def _variables_from_names(descriptor_vars: dict, fitting_vars: dict, energy_bias: np.ndarray) -> dict:
    params: dict = {}
    for name, value in descriptor_vars.items():
        if value is None or _DERIVED.search(name):
            continue
        _set(params, _flax_path(name), np.asarray(value))
    for name, value in fitting_vars.items():
        _set(params, ("fitting",) + _flax_path(name), np.asarray(value))
    return {"params": params, "stats": {"energy_bias": np.asarray(energy_bias, dtype=np.float64).reshape(-1)}}


def from_serialized(data: dict) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a DeePMD-kit ``model.serialize()`` dict.

    Accepts the NumPy port's dicts (a standard model, or the ``linear`` composition
    that ``bridging_method: zbl`` expands to) and the PyTorch model's (type ``SeZM``
    wrapping an ``atomic_model``, with the bridging settings at the top level).
    """
    bridging = None
    if "atomic_model" in data:  # PyTorch SeZMModel
        if str(data.get("bridging_method", "none")).lower() == "zbl":
            bridging = {"r_inner": data.get("bridging_r_inner", 0.5), "r_outer": data.get("bridging_r_outer", 0.8)}
        elif str(data.get("bridging_method", "none")).lower() not in ("none", ""):
            raise ConversionError(f"bridging_method {data['bridging_method']!r} is not supported")
        data = data["atomic_model"]
    elif data.get("type") == "linear":
        learned = [m for m in data["models"] if m.get("type") != "inner_potential"]
        inner = [m for m in data["models"] if m.get("type") == "inner_potential"]
        if len(learned) != 1 or len(inner) != 1 or str(inner[0].get("mode", "")).upper() != "ZBL":
            raise ConversionError("only a DPA4 model plus one ZBL inner potential is supported as a linear model")
        if data.get("weights", "sum") != "sum":
            raise ConversionError(f"linear model weights {data.get('weights')!r} are not supported")
        bridging = inner[0]
        data = learned[0]
    descriptor, fitting = data["descriptor"], data["fitting"]
    if str(descriptor.get("type", "")).lower() not in ("sezm", "dpa4"):
        raise ConversionError(f"descriptor type {descriptor.get('type')!r} is not DPA4/SeZM")
    if float(descriptor.get("@version", 1.2)) < 1.1:
        raise ConversionError(f"descriptor version {descriptor.get('@version')} < 1.1 is not supported")
    config = model_config(descriptor["config"], fitting, bridging)
    if bridging is None and descriptor["config"].get("inner_clamp_r_inner") is not None:
        raise ConversionError("descriptor has an inner clamp but the model has no ZBL inner potential")
    networks = fitting["nets"]["networks"]
    if len(networks) != 1:
        raise ConversionError("only mixed-type fitting (one network) is supported")
    bias = np.asarray(fitting["@variables"]["bias_atom_e"]).reshape(-1)
    out_bias = data.get("@variables", {}).get("out_bias")
    if out_bias is not None:
        bias = bias + np.asarray(out_bias).reshape(-1)
    return config, _variables_from_names(descriptor["@variables"], networks[0]["@variables"], bias)


def from_checkpoint(path: str | Path) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a DeePMD-kit PyTorch ``.pt`` checkpoint (needs torch)."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading a .pt checkpoint needs torch; export it with "
                              "`model.serialize()` instead") from e
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    params = state.get("_extra_state", {}).get("model_params")
    if params is None:
        raise ConversionError(f"{path}: no model_params in the checkpoint's _extra_state")
    tensors = {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
    prefix = next((k.split("atomic_model.")[0] for k in tensors if "atomic_model.descriptor." in k), None)
    if prefix is None:
        raise ConversionError(f"{path}: no DPA4 descriptor weights found")
    start = prefix + "atomic_model."
    descriptor_vars = {k[len(start + "descriptor."):]: v for k, v in tensors.items() if k.startswith(start + "descriptor.")}
    fit_start = start + "fitting_net.filter_layers.networks.0."
    fitting_vars = {k[len(fit_start):]: v for k, v in tensors.items() if k.startswith(fit_start)}
    bias = tensors.get(start + "fitting_net.bias_atom_e", 0.0) + tensors.get(start + "out_bias", 0.0)
    descriptor_cfg = dict(params["descriptor"], type_map=params["type_map"])
    bridging = None
    if str(params.get("bridging_method", "none")).lower() == "zbl":
        bridging = {"r_inner": params.get("bridging_r_inner", 0.5), "r_outer": params.get("bridging_r_outer", 0.8)}
    config = model_config(descriptor_cfg, params.get("fitting_net"), bridging)
    return config, _variables_from_names(descriptor_vars, fitting_vars, np.asarray(bias).reshape(-1))


def from_deepmd(source: str | Path | dict) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from a ``model.serialize()`` dict or a path to a ``.pt`` checkpoint."""
    if isinstance(source, dict):
        return from_serialized(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DeePMD-kit model file")
    if path.suffix in (".pt", ".pth"):
        return from_checkpoint(path)
    raise ConversionError(f"{path}: unsupported model file (expected a .pt checkpoint or a serialize() dict)")
