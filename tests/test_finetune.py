"""Fine-tuning: a pretrained model (an imported DeePMD-kit one) trained on new data, its type map remapped by
element, its energy bias refitted, kept or given, parts of it frozen, and the run resumed."""

import csv
import importlib.util
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import ROOT, cu_au_cell
from flax.traverse_util import flatten_dict
from test_reference import reference_model

from dpa4_jax import checkpoint, physics
from dpa4_jax.calculator import DPA4Calculator
from dpa4_jax.config import ConfigError, TrainingConfig, parse_config
from dpa4_jax.convert import from_deepmd
from dpa4_jax.data import fit_energy_bias
from dpa4_jax.data.store import Composition
from dpa4_jax.train import finetune, freeze
from dpa4_jax.train.loop import fit
from dpa4_jax.variables import init_variables

# The pretrained model knows Au, Cu, Pt; it is fine-tuned on the EMT set's Al, Ni, Cu, Au (conftest TRAIN_MODEL):
# Cu and Au change places, Al and Ni are new, Pt is dropped.
PRETRAINED_MAP = ["Au", "Cu", "Pt"]
PRETRAINED_BIAS = np.array([0.1, 0.25, -0.4])  # eV, near the EMT set's
NEW_MAP = ["Al", "Ni", "Cu", "Au"]
FROZEN = ["type_embedding", "blocks_0/so2_conv"]
TRAINING = {"steps": 6, "batch_atoms": 40, "validate_every": 3, "checkpoint_every": 100, "dtype": "float64",
            "n_budgets": 1, "ema_decay": 0.5}  # a short EMA: the validated (EMA) model follows 6 steps


def _train_main():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny DeePMD-kit DPA4 (TRAIN_MODEL's architecture, small random weights) imported by ``from_deepmd``,
    with a per-element energy bias and its energy head scaled down to a trained model's size (random weights
    give ~1 eV/atom), saved as a dpa4-jax model directory: ``(path, config, variables)``."""
    data, _ = reference_model(lmax=1, n_blocks=1, mixing_layers=2, channels=8, rcut=3.5, n_radial=4,
                              type_map=PRETRAINED_MAP)
    config, variables = from_deepmd(data)
    variables["stats"]["energy_bias"] = PRETRAINED_BIAS.copy()
    variables["params"]["fitting"]["output_layer"]["matrix"] *= 0.1
    path = tmp_path_factory.mktemp("pretrained") / "model"
    checkpoint.save_model(path, variables, yaml.safe_dump({"model": config.to_dict()}))
    return path, config, variables


def config_file(emt_file, **training) -> dict:
    """A fine-tuning config file's mapping (model: only the new type map and sel)."""
    return {"model": {"type_map": NEW_MAP, "sel": 30}, "data": {"train": str(emt_file), "val_fraction": 0.25},
            "training": {**TRAINING, **training}, "optimizer": {"lr": 5e-3, "warmup_steps": 2}}


def finetune_config(pretrained, tmp_path, emt_file, **training):
    """``(config, config text)`` as train.py makes them with ``--init-model``."""
    data = finetune.adopt_init_model(config_file(emt_file, **training), pretrained[0], "ft.yaml")
    return parse_config(data, tmp_path / "ft.yaml"), yaml.safe_dump(data, sort_keys=False)


def metrics(workdir):
    return {int(r["step"]): r for r in csv.DictReader(open(workdir / "metrics.csv"))}


def test_remapped_model_keeps_rows_and_energies_of_shared_elements(pretrained, emt_file, tmp_path):
    """Before any step, the model on the new (permuted, extended) type map gives the pretrained model's energy
    on a Cu3Au cell; its type-indexed rows are the pretrained ones for Cu and Au (and the padding
    row), the fresh initialisation's for Al and Ni."""
    _, old_config, old_variables = pretrained
    config, _ = finetune_config(pretrained, tmp_path, emt_file)
    fresh = init_variables(config.model, seed=0, dtype="float64")
    variables, seen = finetune.pretrained_start(config, fresh)
    assert seen.tolist() == [False, False, True, True]
    indexed = finetune.type_indexed(config.model)
    assert sorted("/".join(p) for p in indexed) == ["params/env_seed_embedding/env_type_embed/adam_type_embedding",
                                                    "params/type_embedding/adam_type_embedding", "stats/energy_bias"]
    old, new, init = (jax.tree.map(np.asarray, flatten_dict(v)) for v in (old_variables, variables, fresh))
    for p, pad in indexed.items():
        np.testing.assert_array_equal(new[p][[2, 3]], np.asarray(old[p])[[1, 0]])  # Cu, Au
        np.testing.assert_array_equal(new[p][:2], init[p][:2])  # Al, Ni: fresh
        np.testing.assert_array_equal(new[p][4:], np.asarray(old[p])[3:])  # padding row
        assert new[p].shape[0] == 4 + pad
    atoms = cu_au_cell()
    energy = jax.jit(physics.energy, static_argnums=0)  # no forces: one forward pass to compile per model
    old_calc, new_calc = (DPA4Calculator(c, v, dtype="float64") for c, v in ((old_config, old_variables),
                                                                             (config.model, variables)))
    before, after = (float(energy(c.model, c.variables, jax.tree.map(jnp.asarray, c.graph(atoms)))[0])
                     for c in (old_calc, new_calc))
    np.testing.assert_allclose(after, before, rtol=1e-12)
    assert abs(before - (3 * PRETRAINED_BIAS[1] + PRETRAINED_BIAS[0])) > 1e-3  # the network is not trivial


@pytest.fixture(scope="module")
def finetuned(pretrained, emt_file, tmp_path_factory):
    """``train.py --init-model`` of the pretrained model on the EMT set, with training.freeze and energy_bias
    keep: ``(config file, work directory)``."""
    tmp = tmp_path_factory.mktemp("finetuned")
    cfg = tmp / "ft.yaml"
    cfg.write_text(yaml.safe_dump(config_file(emt_file, freeze=FROZEN, energy_bias="keep")))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp / "xla_cache"))  # train.py then leaves JAX's cache alone
        assert _train_main()(["--config", str(cfg), "--init-model", str(pretrained[0]), "--workdir", str(tmp / "run"),
                              "--quiet"]) == 0
    return cfg, tmp / "run"


def test_finetuning_an_imported_deepmd_model_lowers_its_error(finetuned):
    """Validation errors (EMA weights) before the first step and after the sixth: the energy error falls by a
    third (measured: 89 -> 56 meV/atom); the force error only just (842 -> 841 meV/Å: the EMT forces are far
    from the pretrained model's, and the message-passing blocks' SO(2) part and type embeddings are frozen)."""
    rows = metrics(finetuned[1])
    start, end = rows[0], rows[6]
    assert float(end["energy_mae"]) < 0.8 * float(start["energy_mae"]), (start["energy_mae"], end["energy_mae"])
    assert float(end["force_mae"]) < float(start["force_mae"]), (start["force_mae"], end["force_mae"])


def test_the_run_records_its_init_model_and_keeps_the_pretrained_bias(pretrained, finetuned):
    stored = yaml.safe_load((finetuned[1] / "config.yaml").read_text())
    assert stored["training"]["init_model"] == str(pretrained[0].resolve())
    assert stored["model"]["type_map"] == NEW_MAP and stored["model"]["channels"] == 8
    # energy_bias keep: Cu and Au keep the pretrained values, Al and Ni (new) are fitted
    bias = np.asarray(checkpoint.load_model(finetuned[1] / "model")[1]["stats"]["energy_bias"])
    assert bias[2] == PRETRAINED_BIAS[1] and bias[3] == PRETRAINED_BIAS[0] and np.all(bias[:2] != 0)


def test_frozen_parts_stay_bit_identical(finetuned):
    """In the raw weights and the EMA of the last checkpoint and in the saved model; the rest has moved."""
    cfg, run = finetuned
    config = parse_config(yaml.safe_load((run / "config.yaml").read_text()), cfg)
    start = finetune.pretrained_start(config, init_variables(config.model, seed=0, dtype="float64"))[0]["params"]
    mask = jax.tree.leaves(freeze.frozen_mask(start, FROZEN))
    raw = checkpoint.load_raw(checkpoint.list_checkpoints(run)[-1])["state"]
    for trained in (raw["params"], raw["ema_params"], checkpoint.load_model(run / "model")[1]["params"]):
        for frozen, before, after in zip(mask, jax.tree.leaves(start), jax.tree.leaves(trained), strict=True):
            if frozen:
                assert np.asarray(after).tobytes() == np.asarray(before).tobytes()
            else:
                assert not np.array_equal(after, before)
    assert 0 < sum(mask) < len(mask)


def test_an_interrupted_finetuning_run_resumes_from_its_checkpoints(finetuned, pretrained, tmp_path):
    """Stopped after 2 steps, the run resumes without its init model (moved away) and ends bit for bit as
    the straight one."""
    cfg, run = finetuned
    stored = yaml.safe_load((run / "config.yaml").read_text())
    moved = tmp_path / "init_copy"
    shutil.copytree(pretrained[0], moved)
    config = parse_config({**stored, "training": {**stored["training"], "init_model": str(moved)}}, cfg)
    text = yaml.safe_dump(stored)
    fit(config, tmp_path / "run", text, progress=False, devices=jax.devices()[:1], stop_after=2)
    shutil.move(moved, tmp_path / "gone")
    fit(config, tmp_path / "run", text, progress=False, devices=jax.devices()[:1])
    for x, y in zip(jax.tree.leaves(checkpoint.load_model(run / "model")[1]),
                    jax.tree.leaves(checkpoint.load_model(tmp_path / "run" / "model")[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_energy_bias_refit_keep_and_given_values():
    """Frames whose energies are exactly sum_t n_t b_t: refit recovers b; keep holds the pretrained values of
    the elements the init model knew and fits the others; given values are held and the rest fitted."""
    b = np.array([-3.0, -4.0, -5.0, -6.0])
    rng = np.random.default_rng(0)
    numbers = [rng.choice([13, 28, 29, 79], size=rng.integers(2, 9)) for _ in range(12)]
    counts = np.array([[np.sum(n == z) for z in (13, 28, 29, 79)] for n in numbers])
    frames = [Composition(n, float(c @ b), f"f{i}") for i, (n, c) in enumerate(zip(numbers, counts))]

    def fitted(setting, pretrained=None, seen=None):
        return fit_energy_bias(frames, NEW_MAP, fixed=finetune.fixed_energy_bias(setting, NEW_MAP, pretrained, seen))

    np.testing.assert_allclose(fitted("refit"), b, rtol=1e-12)
    seen = np.array([False, False, True, True])
    np.testing.assert_allclose(fitted("keep", np.array([0.0, 0.0, -5.0, -6.0]), seen), b, rtol=1e-12)
    wrong = fitted("keep", np.array([0.0, 0.0, -5.0, -9.0]), seen)
    assert wrong[2] == -5.0 and wrong[3] == -9.0 and not np.allclose(wrong[:2], b[:2])
    given = TrainingConfig(energy_bias={"Cu": -5.0, "Al": -3.0}).energy_bias
    np.testing.assert_allclose(fitted(given), b, rtol=1e-12)
    assert fitted(TrainingConfig(energy_bias={"Cu": 7}).energy_bias)[2] == 7.0
    with pytest.raises(ConfigError, match=r"training\.energy_bias: \['Fe'\] not in model\.type_map"):
        fitted(TrainingConfig(energy_bias={"Fe": -8.0}).energy_bias)


def test_bad_finetuning_inputs_name_the_key_or_path(pretrained, emt_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))  # train.py leaves JAX's cache
    with pytest.raises(ConfigError, match=r"training\.energy_bias: 'refit', 'keep' or a mapping"):
        TrainingConfig(energy_bias="fit")
    with pytest.raises(ConfigError, match=r"training\.energy_bias\.Cu: expected a finite number"):
        TrainingConfig(energy_bias={"Cu": "low"})
    with pytest.raises(ConfigError, match=r"training\.energy_bias: unknown element symbol 'Xy'"):
        TrainingConfig(energy_bias={"Xy": 1.0})
    with pytest.raises(ConfigError, match=r"training\.energy_bias: 'keep' needs a pretrained model"):
        TrainingConfig(energy_bias="keep")
    params = pretrained[2]["params"]
    with pytest.raises(ConfigError, match=r"training\.freeze: 'type_embeding': no top-level .* valid: .*type_embedding"):
        freeze.frozen_mask(params, ["type_embeding"])
    with pytest.raises(ConfigError, match=r"'blocks_0/so2': no entry under blocks_0 'so2'; valid: .*so2_conv"):
        freeze.frozen_mask(params, ["blocks_0/so2"])
    with pytest.raises(ConfigError, match=r"ft\.yaml: model\.channels is 16 but the init model has 8"):
        finetune.adopt_init_model({"model": {"channels": 16}}, pretrained[0], "ft.yaml")
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(config_file(emt_file, freeze=["fiting"])))
    main = _train_main()
    missing = tmp_path / "no_such_model"
    assert main(["--config", str(cfg), "--init-model", str(missing), "--workdir", str(tmp_path / "a")]) == 2
    assert f"init model {missing}: no such file or directory" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--init-model", str(pretrained[0]), "--workdir", str(tmp_path / "b"),
                 "--quiet"]) == 2
    assert "training.freeze: 'fiting': no top-level parameter 'fiting'; valid:" in capsys.readouterr().err
