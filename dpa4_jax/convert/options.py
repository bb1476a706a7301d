"""DeePMD-kit 3.2.0's DPA4 options, read exactly or refused: the model, descriptor and fitting keys.

Every key a 3.2.0 model can carry is in one of these tables: read into a :class:`ModelConfig` (with the type
3.2.0 gives it), fixed to the one value dpa4-jax implements, or without effect on the energy function
(precision, seeds, training switches). Anything else, a value of another type, or a fixed option set
otherwise is a :class:`ConversionError` naming the key and the value; the import never guesses.
"""

from __future__ import annotations

from typing import Any

from dpa4_jax.config import ModelConfig


class ConversionError(ValueError):
    """The reference model uses something dpa4-jax does not implement."""


# Descriptor options read into ModelConfig, with the types DeePMD-kit 3.2.0 accepts (bool is not an int here).
_READ = {
    "type_map": list, "rcut": (int, float), "channels": int, "n_radial": int, "lmax": int, "mmax": (int, type(None)),
    "n_blocks": int, "mixing_layers": int, "so2_layers": int, "n_focus": int, "radial_so2_rank": int,
    "n_atten_head": int, "ffn_blocks": int, "ffn_neurons": int, "radial_mlp": list, "env_exp": list,
    "edge_norm": bool, "eps": (int, float), "sel": (int, list), "mlp_bias": bool, "ffn_so3_grid": bool,
    "message_node_so3": bool, "so3_readout": str, "kmax": int, "grid_mlp": (bool, list), "grid_branch": (int, list),
    "random_gamma": bool, "inner_clamp_r_inner": (int, float, type(None)),
    "inner_clamp_r_outer": (int, float, type(None)), "s2_activation": list, "lebedev_quadrature": (bool, list),
    "l_schedule": (list, type(None)), "m_schedule": (list, type(None)), "radial_so2_mode": str,
    "sandwich_norm": list, "add_chg_spin_ebd": bool, "default_chg_spin": (list, type(None)),
}
# Options that must keep these values (dpa4-jax implements only these settings).
FIXED_OPTIONS = {
    "basis_type": "bessel", "use_env_seed": True, "edge_cartesian": False, "node_cartesian": "none",
    "so2_norm": False, "so2_attn_res": "none", "focus_dim": 0,
    "layer_scale": False, "atten_f_mix": False, "atten_v_proj": False, "atten_o_proj": False,
    "full_attn_res": "none", "block_attn_res": "none",
    "node_wise_s2": False, "node_wise_so3": False, "message_node_s2": False, "readout_layers": 1,
    "activation_function": "silu", "glu_activation": True, "exclude_types": [], "extra_node_l": 0,
    "use_spin": None,
}
# Options with no effect on the energy function: numerics, seeds, what trains; ntypes is checked against type_map.
_NO_EFFECT = ("type", "precision", "seed", "trainable", "use_amp", "ntypes")
# The values of the read options that dpa4-jax implements (others are refused by name).
_CHOICES = {"radial_so2_mode": ("degree_channel", "none")}
# Options that matter only when the branch they configure is on: (key, index, value dpa4-jax implements). The
# node-wise grid path and the S2 activation of the SO(2) stack are always off, so grid_mlp[0], grid_branch[0],
# lebedev_quadrature[0] never matter; the FFN's S2 grid settings do not with ffn_so3_grid.
_S2_FFN_OPTIONS = (("s2_activation", 1, True), ("lebedev_quadrature", 1, True))
# Options the reference accepts either as one value or as a per-branch list.
_BROADCAST = {"grid_mlp": 3, "grid_branch": 3, "lebedev_quadrature": 2}

# Fitting (``dpa4_ener``) keys: fixed values, and those without effect (derived sizes, numerics, statistics).
FIXED_FITTING_OPTIONS = {"activation_function": "silu"}  # the GLU gate's activation, compared case-insensitively
_FITTING_FIXED_EXACT = {
    "numb_fparam": 0, "numb_aparam": 0, "dim_case_embd": 0, "case_film_embd": False, "atom_ener": [],
    "exclude_types": [], "resnet_dt": False, "use_aparam_as_mask": False, "spin": None, "var_name": "energy",
    "dim_out": 1, "mixed_types": True, "tot_ener_zero": False, "bias_out": False, "default_fparam": None,
    "layer_name": None,
}
_FITTING_NO_EFFECT = ("@class", "@version", "@variables", "nets", "type", "neuron", "n_neuron", "precision", "seed",
                      "trainable", "rcond", "ntypes", "type_map", "dim_descrpt")
FITTING_TYPES = ("dpa4_ener", "sezm_ener")

# Model-level keys of a training input (a .pt checkpoint's model_params) and of serialize() dicts.
_MODEL_FIXED = {"pair_exclude_types": [], "atom_exclude_types": [], "use_srtab": None, "modifier": None,
                "compress": None, "spin": None, "lora": None, "dens_fitting": None, "dens_fitting_net": None,
                "active_mode": "ener"}
_MODEL_NO_EFFECT = ("type", "type_map", "descriptor", "fitting_net", "fitting", "atomic_model", "data_stat_nbatch",
                    "data_stat_protect", "data_bias_nsample", "smin_alpha", "sw_rmin", "sw_rmax", "preset_out_bias",
                    "srtab_add_bias", "type_embedding", "finetune_head", "use_compile", "enable_tf32",
                    "model_branch_alias", "info", "bridging_method", "bridging_r_inner", "bridging_r_outer", "rcond",
                    "@class", "@version", "@variables", "model_dict", "shared_dict", "_comment")
MODEL_TYPES = ("dpa4", "sezm", "standard", "SeZM", "DPA4")


def _fail(what: str, key: str, value, why: str):
    raise ConversionError(f"{what} option {key}={value!r}: {why}")


def _check_keys(what: str, options: dict, known, fixed: dict) -> None:
    """Unknown keys and fixed ones set otherwise are errors naming them (``None`` stands for "not set")."""
    unknown = sorted(set(options) - set(known) - set(fixed))
    if unknown:
        shown = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise ConversionError(f"{what} option(s) {shown}: unknown to dpa4-jax (not an option of DeePMD-kit 3.2.0's "
                              "DPA4 that it reads)")
    for key, expected in fixed.items():
        value = options.get(key, expected)
        empty = value in (None, [], {}, "") and expected in (None, [], {})
        if value != expected and not empty:
            _fail(what, key, value, f"not supported (dpa4-jax implements {expected!r})")


def check_model_options(params: dict, where: str) -> None:
    """The model-level keys of a training input or ``serialize()`` dict (spin, density heads, LoRA, exclusions,
    modifiers are refused by name)."""
    _check_keys(f"{where}: model", params, _MODEL_NO_EFFECT, _MODEL_FIXED)
    if str(params.get("type", "dpa4")) not in MODEL_TYPES:
        raise ConversionError(f"{where}: model type {params.get('type')!r} is not a DPA4 (SeZM) model")


def check_fitting_options(fitting: dict) -> None:
    """The energy fitting's keys: one GLU layer (``neuron``), the silu gate, no extra inputs or heads."""
    _check_keys("fitting", fitting, (*_FITTING_NO_EFFECT, *FIXED_FITTING_OPTIONS), _FITTING_FIXED_EXACT)
    if "type" in fitting and str(fitting["type"]) not in FITTING_TYPES:
        raise ConversionError(f"fitting type {fitting['type']!r} is not DPA4's energy fitting ({FITTING_TYPES})")
    for key, expected in FIXED_FITTING_OPTIONS.items():
        value = fitting.get(key, expected)
        if str(value).lower() != expected:
            _fail("fitting", key, value, f"not supported (dpa4-jax implements {expected!r})")
    neuron = fitting.get("neuron", fitting.get("n_neuron")) or [0]
    if not isinstance(neuron, list) or len(neuron) != 1:
        _fail("fitting", "neuron", neuron, "only one GLU layer is supported")


def _check_types(c: dict) -> None:
    for key, types in _READ.items():
        value = c.get(key)
        if key in c and (not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types))):
            names = " or ".join(t.__name__ if t is not type(None) else "null" for t in _as_tuple(types))
            _fail("descriptor", key, value, f"expected {names}, as DeePMD-kit 3.2.0 reads it")
    if "env_exp" in c and (len(c["env_exp"]) != 2 or not all(isinstance(x, int) for x in c["env_exp"])):
        _fail("descriptor", "env_exp", c["env_exp"], "expected two integers [rbf_env_exp, edge_env_exp]")
    for key, choices in _CHOICES.items():
        if key in c and str(c[key]).lower() not in choices:
            _fail("descriptor", key, c[key], f"not supported (dpa4-jax implements {' or '.join(map(repr, choices))})")
    if "sandwich_norm" in c and (len(c["sandwich_norm"]) != 4 or not all(isinstance(x, bool) for x in
                                                                        c["sandwich_norm"])):
        _fail("descriptor", "sandwich_norm", c["sandwich_norm"], "expected four booleans [so2_pre, so2_post, "
              "ffn_pre, ffn_post]")
    if "ntypes" in c and c["ntypes"] != len(c.get("type_map", [])):
        _fail("descriptor", "ntypes", c["ntypes"], f"the type map lists {len(c.get('type_map', []))} elements")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _check_branch_options(c: dict) -> None:
    """Options of branches dpa4-jax implements only one way (and those that matter only when their branch is
    on)."""
    if list(c.get("s2_activation", [False, True]))[0]:
        _fail("descriptor", "s2_activation[0]", True, "an S2 grid in the SO(2) stack is not supported")
    if not c.get("ffn_so3_grid", False):
        for key, index, expected in _S2_FFN_OPTIONS:
            if key in c and c[key][index] != expected:
                _fail("descriptor", f"{key}[{index}]", c[key][index],
                      f"not supported (dpa4-jax implements {expected!r} for the FFN's S2 grid)")
    for key in ("l_schedule", "m_schedule"):
        if c.get(key) and len(set(c[key])) > 1:
            _fail("descriptor", key, c[key], "a varying schedule is not supported")
    radial_mlp = c.get("radial_mlp") or [0]
    if len(radial_mlp) != 1:
        _fail("descriptor", "radial_mlp", radial_mlp, "only one hidden layer is supported")


def model_config(descriptor: dict, fitting: dict | None = None, bridging: dict | None = None) -> ModelConfig:
    """A ``ModelConfig`` from the reference's descriptor config (and fitting, bridging settings)."""
    c = dict(descriptor)
    _check_keys("descriptor", c, (*_READ, *_NO_EFFECT), FIXED_OPTIONS)
    _check_types(c)
    for key, n in _BROADCAST.items():
        if key in c and not isinstance(c[key], list):
            c[key] = [c[key]] * n
    _check_branch_options(c)
    fitting = fitting or {}
    check_fitting_options(fitting)
    neuron = fitting.get("neuron", fitting.get("n_neuron")) or [0]
    lmax, sel = c.get("lmax", 3), c.get("sel", 384)
    kwargs: dict[str, Any] = dict(
        type_map=tuple(c["type_map"]), rcut=float(c.get("rcut", 6.0)), channels=c.get("channels", 64),
        n_radial=c.get("n_radial", 16), lmax=lmax, mmax=lmax if c.get("mmax", 1) is None else c.get("mmax", 1),
        n_blocks=c.get("n_blocks", 3), mixing_layers=c.get("so2_layers") or c.get("mixing_layers", 4),
        n_focus=c.get("n_focus", 1), radial_so2_rank=c.get("radial_so2_rank", 1),
        n_atten_head=c.get("n_atten_head", 1), ffn_blocks=c.get("ffn_blocks", 1),
        ffn_neurons=c.get("ffn_neurons", 0), fitting_neurons=int(neuron[0]),
        radial_hidden=int((c.get("radial_mlp") or [0])[0]), env_exp=tuple(c.get("env_exp", (7, 5))),
        edge_norm=c.get("edge_norm", True), eps=float(c.get("eps", 1e-7)),
        sel=int(sum(sel) if isinstance(sel, list) else sel), mlp_bias=c.get("mlp_bias", False),
        ffn_so3_grid=c.get("ffn_so3_grid", False), message_node_so3=c.get("message_node_so3", False),
        so3_readout=str(c.get("so3_readout", "none")).lower(), kmax=c.get("kmax", 1),
        grid_mlp=(False, *map(bool, c.get("grid_mlp", [False] * 3)[1:])),  # entry 0: node-wise, always off
        grid_branch=(0, *map(int, c.get("grid_branch", [0] * 3)[1:])),
        random_gamma=c.get("random_gamma", True),
        radial_so2_mode=str(c.get("radial_so2_mode", "degree_channel")).lower(),
        sandwich_norm=tuple(c.get("sandwich_norm", (False, True, True, False))),
        add_chg_spin_ebd=c.get("add_chg_spin_ebd", False),
        # The default acts only with the embedding (the reference ignores it otherwise).
        default_chg_spin=_default_chg_spin(c) if c.get("add_chg_spin_ebd", False) else None,
    )
    r_in, r_out = c.get("inner_clamp_r_inner"), c.get("inner_clamp_r_outer")
    if bridging is not None:
        r_in, r_out = bridging.get("r_inner", r_in), bridging.get("r_outer", r_out)
    if r_in is not None and r_out is not None:
        kwargs.update(bridging="zbl", bridging_r_inner=float(r_in), bridging_r_outer=float(r_out))
    return ModelConfig(**kwargs)


def _default_chg_spin(c: dict) -> tuple[int, int] | None:
    value = c.get("default_chg_spin")
    if value is None:
        return None
    if len(value) != 2 or any(float(v) != int(v) for v in value):
        _fail("descriptor", "default_chg_spin", value, "expected [charge, spin multiplicity], whole numbers")
    return int(value[0]), int(value[1])


# ModelConfig fields that are not descriptor options of the same name (all the others are).
_NOT_DESCRIPTOR = ("type_map", "fitting_neurons", "radial_hidden", "bridging", "bridging_r_inner", "bridging_r_outer")


def deepmd_config(config: ModelConfig, precision: str = "float64") -> dict:
    """The DeePMD-kit model section (``input.json``'s ``model``) of ``config``: the inverse of
    :func:`model_config`. Auto widths (0) are written resolved, as the reference stores them."""
    named = {k: v for k, v in config.to_dict().items() if k not in _NOT_DESCRIPTOR}
    # random_gamma is written as set (it acts in training only, in both codes); use_amp: the reference's bf16
    # autocast, a training-time choice.
    descriptor = {**FIXED_OPTIONS, **named, "type": "dpa4", "radial_mlp": [config.radial_hidden or config.channels],
                  "precision": precision, "seed": 0, "use_amp": False}
    fitting = {**FIXED_FITTING_OPTIONS, "type": "dpa4_ener", "neuron": [config.hidden_fitting],
               "precision": precision, "seed": 0}
    model = {"type_map": list(config.type_map), "descriptor": descriptor, "fitting_net": fitting}
    if config.bridging == "zbl":
        model.update(bridging_method="zbl", bridging_r_inner=config.bridging_r_inner,
                     bridging_r_outer=config.bridging_r_outer)
    return model
