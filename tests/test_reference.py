"""Equivalence with the reference, DeePMD-kit 3.2.0 (its NumPy port): parameter counts, optimizer
routing, and energies, forces and virials of the same weights on the same structures."""

import copy
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.data import chemical_symbols
from conftest import ROOT

from dpa4_jax import graph as graphs
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.config import ModelConfig, load_model_config
from dpa4_jax.convert import ConversionError, model_config
from dpa4_jax.elements import species_indices
from dpa4_jax.model import DPA4
from dpa4_jax.optim import route

# Measured with DeePMD-kit 3.2.0 on the paper's Tables S-17/S-18 (paper: 1.60M, 2.76M, 5.40M, 20.91M, 2.7M, 5.4M).
REFERENCE_COUNTS = {"neo_mptrj": 1_594_036, "air_mptrj": 2_760_565, "plus_mptrj": 5_392_182,
                    "pro_mptrj": 20_904_510, "air_spice": 2_754_245, "plus_spice": 5_385_862}
# The same with the ablation switch mlp_bias on (Pro has two focus streams, hence focus_compete_bias).
REFERENCE_COUNTS_MLP_BIAS = {"air_mptrj": 2_766_069, "pro_mptrj": 20_924_810}
# DPA4-Mini (DeePMD-kit's examples/water/dpa4/arc_variants/input-mini.json, model section as written there), and
# Air with Mini's extras on (message_node_so3, ffn_so3_grid, grid_branch [1, 1, 1], so3_readout mlp), 89 types.
# Measured with DeePMD-kit 3.2.0's NumPy port: get_model(model_args().normalize_value(config)).serialize(), the
# floating-point @variables summed without buffers and statistics (convert._DERIVED, out_bias, out_std,
# bias_atom_e, mean, stddev, wigner_calc.*); the same count gives Air's 2,760,565. (reference-study.md's
# 5,145,589 for Air with the extras was not reproduced: 5,183,029 here.)
REFERENCE_COUNTS["mini_water"] = 915_404
AIR_MINI_EXTRAS = dict(message_node_so3=True, ffn_so3_grid=True, grid_branch=(0, 1, 1), so3_readout="mlp")
REFERENCE_COUNT_AIR_MINI_EXTRAS = 5_183_029
# DeePMD-kit's published DPA4 grades (its deepmd/utils/model_preset_data.py, version v20260820: 118 elements, the
# shared options below), counted the same way with DeePMD-kit 3.2.0; the OMol25 models add the charge/spin
# embedding (the v20260901 sandwich [True, False, True, False] has the same count as the default).
PUBLISHED = dict(type_map=tuple(chemical_symbols[1:119]), rcut=6.0, n_radial=16, mmax=1, n_atten_head=1,
                 message_node_so3=True, ffn_so3_grid=True, grid_branch=(0, 0, 1), so3_readout="mlp")
PUBLISHED_COUNTS = {
    "nano": (dict(channels=32, lmax=1, n_blocks=2, mixing_layers=3, radial_so2_mode="none"), 480_364),
    "mini": (dict(channels=32, lmax=2, n_blocks=2, mixing_layers=3), 655_084),
    "nano_omol": (dict(channels=32, lmax=1, n_blocks=2, mixing_layers=3, radial_so2_mode="none",
                       add_chg_spin_ebd=True, default_chg_spin=(0, 1)), 492_044),
}


def param_shapes(config):
    model = DPA4(config)
    args = (jnp.zeros(2, jnp.int32), jnp.ones((2, 3), jnp.float32), jnp.array([1, 0]), jnp.array([0, 1]),
            jnp.ones(2, bool))
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


@pytest.mark.parametrize("name, mlp_bias", [(name, False) for name in sorted(REFERENCE_COUNTS)]
                         + [(name, True) for name in sorted(REFERENCE_COUNTS_MLP_BIAS)])
def test_parameter_count(name, mlp_bias):
    config = dataclasses.replace(load_model_config(ROOT / "configs" / f"{name}.yaml"), mlp_bias=mlp_bias)
    expected = (REFERENCE_COUNTS_MLP_BIAS if mlp_bias else REFERENCE_COUNTS)[name]
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(config))) == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_parameter_count_of_published_grades(name):
    options, expected = PUBLISHED_COUNTS[name]
    config = ModelConfig(**PUBLISHED, **options)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(config))) == expected


def test_parameter_count_air_with_mini_extras():
    config = dataclasses.replace(load_model_config(ROOT / "configs" / "air_mptrj.yaml"), **AIR_MINI_EXTRAS)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(config))) == REFERENCE_COUNT_AIR_MINI_EXTRAS


@pytest.mark.parametrize("mlp_bias, adam", [(False, (34, 10_485)), (True, (76, 15_989))])
def test_air_routing_matches_reference(mlp_bias, adam):
    """HybridMuon routes the Air tree as the reference does: 67 tensors / 2,749,696 parameters to Muon,
    34 / 10,485 to Adam, 6 / 384 to AdamW; mlp_bias adds 42 biases / 5,504 parameters, all to Adam."""
    config = dataclasses.replace(load_model_config(ROOT / "configs" / "air_mptrj.yaml"), mlp_bias=mlp_bias)
    shapes = param_shapes(config)
    routes = route(shapes)
    tally = {}
    for r, s in zip(jax.tree.leaves(routes), jax.tree.leaves(shapes)):
        n, size = tally.get(r, (0, 0))
        tally[r] = (n + 1, size + int(np.prod(s.shape)))
    assert tally == {"muon": (67, 2_749_696), "adam": adam, "adamw": (6, 384)}


@pytest.mark.parametrize("options, named", [
    (dict(s2_activation=[False, False]), "s2_activation[1]=False"),  # the FFN without a grid
    (dict(lebedev_quadrature=False), "lebedev_quadrature[1]=False"),  # the FFN's S2 product grid
    (dict(s2_activation=[True, True]), "s2_activation[0]=True"),  # an S2 grid in the SO(2) stack
    (dict(message_node_s2=True), "message_node_s2=True"),
    (dict(node_wise_so3=True), "node_wise_so3=True"),
    (dict(readout_layers=2), "readout_layers=2"),
])
def test_import_refuses_options_that_act(options, named):
    with pytest.raises(ConversionError, match=re.escape(named)):
        model_config({"type_map": TYPE_MAP, "lmax": 2, **options})


def test_import_accepts_options_that_do_not_act():
    """Settings of branches that are off: the FFN's S2 grid under ffn_so3_grid, the node-wise grid path,
    the SO(2) stack's Lebedev flag (its S2 grid is off); kmax without any SO(3) grid."""
    config = model_config({"type_map": TYPE_MAP, "lmax": 2, "ffn_so3_grid": True, "s2_activation": [False, False],
                           "lebedev_quadrature": [False, False], "grid_mlp": True, "grid_branch": [4, 0, 1]})
    assert config.ffn_so3_grid and config.grid_mlp == (False, True, True) and config.grid_branch == (0, 0, 1)
    assert model_config({"type_map": TYPE_MAP, "lmax": 2, "kmax": 2}).kmax == 2


# ----------------------------------------------------------------------------- the reference model

TYPE_MAP = ["Cu", "Au", "C", "Si"]


def reference_model(lmax=3, n_blocks=3, mixing_layers=4, n_focus=1, rank=1, bridging=False, type_map=TYPE_MAP,
                    channels=64, mlp_bias=False, rcut=6.0, n_radial=16, options=None):
    """A DeePMD-kit DPA4 in float64 with its zero-initialised weights filled with small random values
    (``options``: more descriptor options, by the reference's names)."""
    from deepmd.dpmodel.model.base_model import BaseModel
    from deepmd.dpmodel.model.model import get_model
    from deepmd.utils.argcheck import model_args

    config = {"type_map": list(type_map),
              "descriptor": {"type": "dpa4", "rcut": rcut, "sel": 384, "channels": channels, "n_radial": n_radial,
                             "lmax": lmax, "mmax": 1, "n_blocks": n_blocks, "mixing_layers": mixing_layers,
                             "n_focus": n_focus, "radial_so2_rank": rank, "mlp_bias": mlp_bias, "precision": "float64",
                             "seed": 1, "random_gamma": False, "use_amp": False, **(options or {})},
              "fitting_net": {"type": "dpa4_ener", "neuron": [0], "precision": "float64", "seed": 1}}
    if bridging:
        config["bridging_method"] = "zbl"
    data = get_model(model_args().normalize_value(config, trim_pattern="_*")).serialize()
    rng = np.random.default_rng(7)

    def fill_zeros(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "@variables":
                    for name, v in value.items():
                        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size and not v.any() \
                                and name not in ("out_bias", "bias_atom_e", "mean", "stddev"):
                            value[name] = 0.05 * rng.normal(size=v.shape)
                else:
                    fill_zeros(value)
        elif isinstance(node, list):
            for value in node:
                fill_zeros(value)

    fill_zeros(data)
    data["@variables"] = {**data.get("@variables", {})}
    return data, BaseModel.deserialize(copy.deepcopy(data))


def reference_energy(model, atoms):
    atype = np.array([TYPE_MAP.index(s) for s in atoms.get_chemical_symbols()])[None]
    box = atoms.cell.array.reshape(1, 9) if atoms.pbc.all() else None
    charge_spin = np.array([[atoms.info["charge"], atoms.info["spin"]]], float) if "charge" in atoms.info else None
    out = model.call_common(atoms.positions.reshape(1, -1), atype, box=box, neighbor_graph_method="dense",
                            charge_spin=charge_spin)
    return float(out["energy_redu"][0, 0])


def periodic_structure():
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 5]] = 79
    atoms.numbers[3] = 14
    atoms.rattle(0.1, seed=2)
    return atoms


def cluster():
    atoms = Atoms("CSiCuAuC", positions=[[0, 0, 0], [1.9, 0, 0], [0.2, 2.3, 0.1], [2.0, 1.9, 1.7], [-1.4, 0.3, 1.1]])
    atoms.rattle(0.05, seed=4)
    return atoms


def derivative(energy, atoms, direction, strain=False, h=1e-4):
    """Five-point derivative of the energy along a displacement (or strain) direction of unit norm."""
    values = []
    for step in (-2, -1, 1, 2):
        a = atoms.copy()
        if strain:
            a.set_cell(atoms.cell.array @ (np.eye(3) + step * h * direction), scale_atoms=True)
        else:
            a.positions = atoms.positions + step * h * direction
        values.append(energy(a))
    return (values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h)


CASES = {
    "air": dict(),
    "two_focus_rank2": dict(n_blocks=2, mixing_layers=3, n_focus=2, rank=2),
    "zbl": dict(n_blocks=2, mixing_layers=2, bridging=True),
    # Every bias of the switch, the first SO(2) layer's scaled one (Eq. 69) and the focus competition's included.
    "mlp_bias": dict(channels=16, lmax=2, n_blocks=2, mixing_layers=3, n_focus=2, rank=2, mlp_bias=True),
    # The options of the reference's DPA4-Mini example (SO(3)-grid FFNs with one routed branch, two per
    # block, the message-node SO(3) product, the grid-MLP read-out), with random_gamma as the reference's
    # default (a training-time option: the reference's NumPy port, like dpa4-jax, never rolls at inference).
    "mini_options": dict(channels=8, lmax=2, n_blocks=1, mixing_layers=2, n_focus=2, options=dict(
        ffn_so3_grid=True, so3_readout="mlp", grid_branch=[1, 1, 1], ffn_blocks=2, message_node_so3=True,
        random_gamma=True)),
    # The other operations on each path: grid MLP (message node), two routed branches on the FFN's S2 grid,
    # the grid-product read-out, kmax 2, mlp_bias; options that are off are accepted (kmax without ...).
    "grid_variants": dict(channels=8, lmax=2, n_blocks=1, mixing_layers=2, mlp_bias=True, options=dict(
        kmax=2, so3_readout="glu", grid_mlp=[True, True, False], grid_branch=[3, 0, 2], message_node_so3=True,
        lebedev_quadrature=[False, True])),
    # The options of the published models: DPA4-Nano's radial scaling without A1, the sandwich norms (all four
    # positions exercised across the two blocks' flags), DPA4-OMol25's charge/spin embedding with a default.
    "published_options": dict(channels=8, lmax=1, n_blocks=2, mixing_layers=2, options=dict(
        radial_so2_mode="none", sandwich_norm=[True, False, True, True], add_chg_spin_ebd=True,
        default_chg_spin=[0, 1])),
}


def structures(name):
    atoms = [periodic_structure(), cluster()]
    if name == "zbl":  # one pair in the bridging zone, one inside r_in
        atoms[0].positions[2] = atoms[0].positions[1] + [0.4, 0.3, 0.2]
        atoms[1].positions[4] = atoms[1].positions[0] + [0.3, 0.2, 0.1]
    if name == "published_options":  # a charged triplet crystal, the cluster at the default and as an anion
        atoms[0].info.update(charge=1, spin=3)
        anion = atoms[1].copy()
        anion.info.update(charge=-1, spin=2)
        atoms.append(anion)
    return atoms


def reference_case(name, data, ref, atoms_list):
    """``(name, data, expected)`` for ``check``: per structure the reference's energy and its energy
    derivatives along random unit displacement directions (and a strain direction when periodic)."""
    energy = lambda a: reference_energy(ref, a)
    rng = np.random.default_rng(3)
    expected = []
    for atoms in atoms_list:
        moves = [rng.normal(size=atoms.positions.shape) for _ in range(2)]
        moves = [d / np.linalg.norm(d) for d in moves]
        strain = None
        if atoms.pbc.all():
            strain = rng.normal(size=(3, 3))
            strain = 0.5 * (strain + strain.T)
            strain /= np.linalg.norm(strain)
        expected.append({
            "atoms": atoms, "energy": energy(atoms), "moves": [(d, derivative(energy, atoms, d)) for d in moves],
            "strain": None if strain is None else (strain, derivative(energy, atoms, strain, strain=True))})
    return name, data, expected


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """The reference's weights and its values on the structures (``reference_case``)."""
    data, ref = reference_model(**CASES[request.param])
    return reference_case(request.param, data, ref, structures(request.param))


BUDGET = graphs.Budget(n_node=16, n_edge=4096, n_graph=2)


def evaluate(calc, atoms):
    """E, F, virial through a fixed padded budget (one compilation per model and dtype)."""
    species = species_indices(atoms.numbers, calc.config.type_map)
    g = graphs.structure_graph(species, atoms.positions, atoms.cell.array, atoms.pbc, calc.config.rcut,
                               charge_spin=(atoms.info.get("charge"), atoms.info.get("spin")))
    out = calc._compute(calc.variables, jax.tree.map(jnp.asarray, graphs.pad(g, BUDGET)))
    return float(out["energy"][0]), np.asarray(out["forces"][:len(atoms)]), np.asarray(out["virial"][0])


def check(case, dtype, rtol):
    name, data, expected = case
    calc = DPA4Calculator.from_deepmd(data, dtype=dtype)
    for ref in expected:
        e, f, w = evaluate(calc, ref["atoms"])
        assert abs(e - ref["energy"]) <= rtol * abs(ref["energy"]), (name, e, ref["energy"])
        for d, slope in ref["moves"]:  # dE/dt along x + t d is -F.d
            assert abs(-np.sum(f * d) - slope) <= rtol * np.abs(f * d).sum(), (name, -np.sum(f * d), slope)
        if ref["strain"] is not None:  # dE/dt along (1 + t s) is -W:s
            s, slope = ref["strain"]
            assert abs(-np.sum(w * s) - slope) <= rtol * np.abs(w * s).sum(), (name, -np.sum(w * s), slope)


def test_matches_reference_float64(case):
    check(case, "float64", 1e-8)
    if case[0] == "published_options":  # the charge and spin states change the energy (and by the same amounts)
        assert len({round(ref["energy"], 6) for ref in case[2][1:]}) == 2


@pytest.mark.parametrize("case", ["air", "mini_options"], indirect=True)  # one float32 compilation each
def test_matches_reference_float32(case):
    check(case, "float32", 1e-5)


def test_pytorch_model_and_checkpoint_import(tmp_path):
    """The PyTorch reference (when torch and its DeePMD-kit backend are installed): a ``.pt`` training
    checkpoint and its ``model.serialize()`` dict both load, and give the reference's energy and forces."""
    torch = pytest.importorskip("torch")
    try:
        from deepmd.calculator import DP
        from deepmd.pt.model.model import get_model
        from deepmd.pt.train.wrapper import ModelWrapper
        from deepmd.utils.argcheck import model_args
    except Exception as e:  # the PyTorch backend needs extra packages (see benchmarks/reference.py)
        pytest.skip(f"DeePMD-kit's PyTorch backend is not usable here: {e}")
    params = model_args().normalize_value({
        "type_map": TYPE_MAP, "bridging_method": "zbl",
        "descriptor": {"type": "dpa4", "rcut": 6.0, "sel": 64, "channels": 16, "lmax": 2, "n_blocks": 2,
                       "mixing_layers": 2, "n_focus": 2, "radial_so2_rank": 2, "random_gamma": False,
                       "use_amp": False, "precision": "float64", "seed": 3},
        "fitting_net": {"type": "dpa4_ener", "neuron": [0], "precision": "float64", "seed": 3}}, trim_pattern="_*")
    model = get_model(params)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not torch.any(p):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    path = tmp_path / "model.pt"
    torch.save({"model": ModelWrapper(model.eval(), model_params=params).state_dict()}, path)
    atoms = cluster()
    atoms.positions[4] = atoms.positions[0] + [0.45, 0.3, 0.1]  # a pair in the bridging zone
    reference = atoms.copy()
    reference.calc = DP(model=str(path))
    for source in (path, model.serialize()):
        calc = DPA4Calculator.from_deepmd(source, dtype="float64")
        assert calc.config.bridging == "zbl" and calc.config.n_focus == 2
        ours = atoms.copy()
        ours.calc = calc
        np.testing.assert_allclose(ours.get_potential_energy(), reference.get_potential_energy(), rtol=1e-8)
        np.testing.assert_allclose(ours.get_forces(), reference.get_forces(), atol=1e-8 * np.abs(reference.get_forces()).max())
