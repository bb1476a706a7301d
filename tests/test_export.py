"""Export to DeePMD-kit 3.2.0 (``convert.to_deepmd``, the ``.dp`` writer and its command line) and the
import checks: DeePMD-kit's NumPy port evaluates an exported model to our energies, forces and virials,
and reading it back gives the same configuration and bit-identical weights."""

import copy
import dataclasses
import functools
import sys

import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict
from test_reference import (
    TYPE_MAP,
    check,
    reference_case,
    reference_energy,
    reference_model,
    structures,
)

from dpa4_jax import checkpoint, convert
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.convert.__main__ import main as convert_main

# Tiny float64 models: two focus streams of rank 2 at L = 2, one with ZBL bridging, one with the published options.
MODELS = {"plain": {"channels": 8, "lmax": 2, "n_blocks": 1, "mixing_layers": 1, "n_focus": 2, "rank": 2},
          "zbl": {"channels": 8, "lmax": 1, "n_blocks": 1, "mixing_layers": 2, "bridging": True},
          # The published models' options (DPA4-Nano's radial scaling, sandwich norms, OMol25's charge/spin).
          "published_options": {"channels": 8, "lmax": 1, "n_blocks": 1, "mixing_layers": 1, "options": {
              "radial_so2_mode": "none", "sandwich_norm": [True, False, True, True], "add_chg_spin_ebd": True,
              "default_chg_spin": [0, 1]}}}


@functools.cache
def exported(name):
    """``(config, variables, data, case)``: a dpa4-jax model, its export, and the reference's values on
    the export (for ``check``). The model holds the reference's initial weights with the zero ones made
    random (zeros would give zero forces): NumPy only, no JAX compilation."""
    from deepmd.dpmodel.model.base_model import BaseModel

    config, variables = convert.from_deepmd(reference_model(**MODELS[name])[0])
    variables["stats"]["energy_bias"] = np.arange(config.ntypes) - 1.5
    data = convert.to_deepmd(config, variables)
    ref = BaseModel.deserialize(copy.deepcopy(data))
    return config, variables, data, reference_case(name, data, ref, structures(name))


def resolved(config):
    """``config`` as the reference stores it: auto widths (0) resolved."""
    return dataclasses.replace(config, radial_hidden=config.radial_hidden or config.channels,
                               fitting_neurons=config.hidden_fitting)


def assert_same_model(config, variables, back_config, back_variables):
    assert back_config == resolved(config)
    ours, back = flatten_dict(variables["params"]), flatten_dict(back_variables["params"])
    assert ours.keys() == back.keys()
    for path, value in ours.items():
        value = np.asarray(value)
        assert back[path].dtype == value.dtype and np.array_equal(back[path], value), path
    np.testing.assert_array_equal(np.asarray(back_variables["stats"]["energy_bias"]), variables["stats"]["energy_bias"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_evaluates_export(name):
    """DeePMD-kit's NumPy port of the exported model: our energy to 1e-8, our forces and virial to 1e-8
    of its energy's finite differences. ``check`` evaluates the model read back from the export, which
    ``test_round_trip_is_exact`` shows to be the model we exported."""
    check(exported(name)[3], "float64", 1e-8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_exact(name):
    config, variables, data, _ = exported(name)
    assert data["type"] == ("linear" if config.bridging == "zbl" else "standard")
    assert_same_model(config, variables, *convert.from_deepmd(data))
    auto = dataclasses.replace(config, radial_hidden=0, fitting_neurons=0)  # the same widths, as "auto"
    assert convert.from_deepmd(convert.to_deepmd(auto, variables))[0] == config


def test_zbl_biases_add_up():
    """The reference adds the out_bias of the linear composition, of both its members and the fitting's
    bias_atom_e (its energy does not change when the bias moves between them); the import reads the sum."""
    _, variables, data, case = exported("zbl")
    moved = copy.deepcopy(data)
    learned, inner = moved["models"]
    bias = variables["stats"]["energy_bias"].reshape(1, -1, 1)
    moved["@variables"]["out_bias"] = 0.5 * bias
    learned["@variables"]["out_bias"] = 0.25 * bias
    inner["@variables"]["out_bias"] = 0.125 * bias
    learned["fitting"]["@variables"]["bias_atom_e"] = 0.125 * bias.reshape(-1, 1)
    from deepmd.dpmodel.model.base_model import BaseModel

    first = case[2][0]
    assert reference_energy(BaseModel.deserialize(copy.deepcopy(moved)), first["atoms"]) == pytest.approx(
        first["energy"], rel=1e-12)
    np.testing.assert_allclose(convert.from_deepmd(moved)[1]["stats"]["energy_bias"],
                               variables["stats"]["energy_bias"], rtol=1e-15)


@pytest.mark.parametrize("where, suffix", [("run", ".dp"), ("model", ".yaml")])
def test_command_line_writes_deepmd_file(tmp_path, where, suffix):
    """``python -m dpa4_jax.convert`` on a work directory or its model directory: the file reads back
    (through ``DPA4Calculator.from_deepmd``) as the same model, and DeePMD-kit's own inference of it
    gives the reference's energy."""
    from deepmd.infer import DeepPot

    config, variables, _, case = exported("plain")
    run = tmp_path / "run"
    text = yaml.safe_dump({"model": dataclasses.asdict(config), "training": {"dtype": "float64"}})
    checkpoint.save_model(run, variables, text)
    out = tmp_path / f"model{suffix}"
    convert_main([str(run if where == "run" else run / checkpoint.MODEL), str(out)])
    calc = DPA4Calculator.from_deepmd(out, dtype="float64")
    assert_same_model(config, variables, calc.config, calc.variables)
    atoms = case[2][0]["atoms"]  # periodic
    energy = DeepPot(str(out)).eval(atoms.positions.reshape(1, -1), atoms.cell.array.reshape(1, 9),
                                    [TYPE_MAP.index(s) for s in atoms.get_chemical_symbols()])[0]
    assert float(energy[0, 0]) == pytest.approx(case[2][0]["energy"], rel=1e-12)


def test_fitting_activation_is_checked():
    data = copy.deepcopy(exported("plain")[2])
    data["fitting"]["activation_function"] = "tanh"
    with pytest.raises(convert.ConversionError, match="fitting option activation_function='tanh'"):
        convert.from_deepmd(data)


def multi_task_state(config, data, heads):
    """A DeePMD-kit PyTorch multi-task training state dict (the NumPy port keys its variables by the
    PyTorch state-dict names): every head the exported model, its energy bias shifted by the head's index."""
    from deepmd.utils.argcheck import model_args

    section = model_args().normalize_value(convert.deepmd_config(config), trim_pattern="_*")
    state = {"_extra_state": {"model_params": {"model_dict": {head: section for head in heads}}}}
    for i, head in enumerate(heads):
        start = f"model.{head}.atomic_model."
        network = data["fitting"]["nets"]["networks"][0]["@variables"]
        state.update({start + "descriptor." + k: v for k, v in data["descriptor"]["@variables"].items()
                      if isinstance(v, np.ndarray)})
        state.update({start + "fitting_net.filter_layers.networks.0." + k: v for k, v in network.items()})
        state[start + "fitting_net.bias_atom_e"] = data["fitting"]["@variables"]["bias_atom_e"]
        state[start + "out_bias"] = data["@variables"]["out_bias"] + i
    return state


def test_multi_task_heads():
    """A multi-task checkpoint names its heads unless one is chosen; the chosen head's weights are read."""
    config, variables, data, _ = exported("plain")
    state = multi_task_state(config, data, ("water", "metal"))
    with pytest.raises(convert.ConversionError, match=r"model.pt: a multi-task model with heads water, metal; "
                                                      r"choose one with head="):
        convert.from_state_dict(state, "model.pt")
    with pytest.raises(convert.ConversionError, match="no head 'ice'"):
        convert.from_state_dict(state, "model.pt", head="ice")
    metal = dict(variables, stats={"energy_bias": variables["stats"]["energy_bias"] + 1})
    assert_same_model(config, metal, *convert.from_state_dict(state, "model.pt", head="metal"))


def test_export_without_deepmd_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepmd", None)  # makes `import deepmd` fail
    config, variables, _, _ = exported("plain")
    with pytest.raises(ImportError, match=r"pip install deepmd-kit==3\.2\.0"):
        convert.to_deepmd(config, variables)
