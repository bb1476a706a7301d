"""Import from DeePMD-kit 3.2.0 is exact or refuses: every key of the model, descriptor and fitting is read or
refused by name with its value, in ``serialize()`` dicts and in PyTorch training state dicts (NumPy only: the
reference's NumPy port builds the models, no JAX compilation)."""

import copy
import dataclasses
import functools

import numpy as np
import pytest

from dpa4_jax import convert

TYPE_MAP = ["H", "O"]


@functools.cache
def section():
    """A tiny DPA4's model section, normalised by DeePMD-kit (every option at its default)."""
    from deepmd.utils.argcheck import model_args

    model = {"type_map": TYPE_MAP, "fitting_net": {"type": "dpa4_ener", "neuron": [8]},
             "descriptor": {"type": "dpa4", "channels": 8, "lmax": 1, "n_blocks": 1, "mixing_layers": 1,
                            "n_radial": 4, "sel": 20, "rcut": 3.0}}
    return model_args().normalize_value(model, trim_pattern="_*")


@functools.cache
def serialized() -> dict:
    from deepmd.dpmodel.model.model import get_model

    return get_model(copy.deepcopy(section())).serialize()


def state_dict() -> dict:
    """The model as a single-task PyTorch training state dict (the NumPy port keys its variables by the
    PyTorch names) with its training input in ``_extra_state``."""
    data = serialized()
    start = "model.Default.atomic_model."
    state = {"_extra_state": {"model_params": copy.deepcopy(section())}}
    state.update({start + "descriptor." + k: v for k, v in data["descriptor"]["@variables"].items()
                  if isinstance(v, np.ndarray)})
    network = data["fitting"]["nets"]["networks"][0]["@variables"]
    state.update({start + "fitting_net.filter_layers.networks.0." + k: v for k, v in network.items()})
    state[start + "fitting_net.bias_atom_e"] = data["fitting"]["@variables"]["bias_atom_e"]
    return state


def test_the_reference_models_are_read():
    config, variables = convert.from_serialized(copy.deepcopy(serialized()))
    assert (config.channels, config.lmax, config.n_blocks, config.type_map) == (8, 1, 1, tuple(TYPE_MAP))
    from_input = convert.from_state_dict(state_dict(), "model.pt")[0]  # the training input: auto widths (0)
    assert dataclasses.replace(from_input, radial_hidden=from_input.channels) == config


def descriptor(key, value):
    return lambda d: d["descriptor"]["config"].__setitem__(key, value)


def fitting(key, value):
    return lambda d: d["fitting"].__setitem__(key, value)


def model(key, value):
    return lambda d: d.__setitem__(key, value)


BAD_SERIALIZED = {
    "unknown descriptor key": (descriptor("edge_mixer", 2), r"descriptor option\(s\) edge_mixer=2: unknown"),
    "per-site edge_norm": (descriptor("edge_norm", [True, False]), r"edge_norm=\[True, False\]: expected bool"),
    "scalar env_exp": (descriptor("env_exp", 5), r"env_exp=5: expected list"),
    "three env_exp": (descriptor("env_exp", [7, 5, 3]), r"env_exp=\[7, 5, 3\]: expected two integers"),
    "bool channels": (descriptor("channels", True), r"channels=True: expected int"),
    "radial_so2_mode degree": (descriptor("radial_so2_mode", "degree"), r"radial_so2_mode='degree': not supported"),
    "so2_norm": (descriptor("so2_norm", True), r"so2_norm=True: not supported"),
    "exclude_types": (descriptor("exclude_types", [[0, 1]]), r"exclude_types=\[\[0, 1\]\]: not supported"),
    "ntypes": (descriptor("ntypes", 3), r"ntypes=3: the type map lists 2 elements"),
    "fitting fparam": (fitting("numb_fparam", 2), r"fitting option numb_fparam=2: not supported"),
    "fitting activation": (fitting("activation_function", "tanh"), r"activation_function='tanh'"),
    "fitting unknown key": (fitting("film", True), r"fitting option\(s\) film=True: unknown"),
    "fitting type": (fitting("type", "ener"), r"fitting type 'ener' is not DPA4's energy fitting"),
    "fitting two layers": (fitting("neuron", [8, 8]), r"fitting option neuron=\[8, 8\]: only one GLU layer"),
    "pair exclusions": (model("pair_exclude_types", [[0, 1]]), r"model option pair_exclude_types=\[\[0, 1\]\]"),
    "spin": (model("spin", {"use_spin": [True, False]}), r"model option spin=\{'use_spin'"),
    "density head": (model("dens_fitting", {"type": "dens"}), r"model option dens_fitting=\{'type': 'dens'\}"),
    "density mode": (model("active_mode", "dens"), r"model option active_mode='dens'"),
    "unknown model key": (model("modifier_v2", 1), r"model option\(s\) modifier_v2=1: unknown"),
    "old descriptor": (lambda d: d["descriptor"].__setitem__("@version", 1.0), r"descriptor version 1.0"),
    "new descriptor": (lambda d: d["descriptor"].__setitem__("@version", 1.3), r"descriptor version 1.3"),
}


@pytest.mark.parametrize("name", BAD_SERIALIZED)
def test_serialized_models_with_what_dpa4_jax_lacks_are_refused_by_name(name):
    change, message = BAD_SERIALIZED[name]
    data = copy.deepcopy(serialized())
    change(data)
    with pytest.raises(convert.ConversionError, match=message):
        convert.from_serialized(data)


def params(key, value, part=None):
    def change(state):
        p = state["_extra_state"]["model_params"]
        (p if part is None else p[part])[key] = value
    return change


def tensor(name, value=None):
    def change(state):
        key = "model.Default.atomic_model." + name
        if value is None:
            del state[key]
        else:
            state[key] = value
    return change


BAD_STATE = {
    "LoRA adapters": (tensor("descriptor.blocks.0.so2_conv.so2_linears.0.A_m0", np.zeros((2, 3))),
                      r"model.pt: LoRA adapters \(descriptor.blocks.0.so2_conv.so2_linears.0.A_m0\) are not supported"),
    "density head weights": (tensor("dens_fitting_net.networks.0.matrix", np.zeros((8, 8))),
                             r"model.pt: a density \(DeNS\) fitting head"),
    "no version (before 1.1)": (tensor("descriptor.version_tensor"), r"model.pt: descriptor version 1.0"),
    "spin model": (params("spin", {"use_spin": [True, False]}), r"model.pt: model option spin="),
    "LoRA config": (params("lora", {"rank": 4}), r"model.pt: model option lora=\{'rank': 4\}"),
    "model type": (params("type", "linear_ener"), r"model.pt: model type 'linear_ener' is not a DPA4"),
    "descriptor type": (params("type", "se_e2_a", "descriptor"), r"model.pt: descriptor type 'se_e2_a'"),
    "fitting type": (params("type", "ener", "fitting_net"), r"model.pt: fitting type 'ener'"),
    "bridging": (params("bridging_method", "tabulated"), r"model.pt: bridging_method 'tabulated'"),
}


@pytest.mark.parametrize("name", BAD_STATE)
def test_checkpoints_with_what_dpa4_jax_lacks_are_refused_by_name(name):
    change, message = BAD_STATE[name]
    state = state_dict()
    change(state)
    with pytest.raises(convert.ConversionError, match=message):
        convert.from_state_dict(state, "model.pt")
