"""Config files: every shipped config loads; mistakes are named with their key and file."""

import pytest

from conftest import ROOT
from dpa4_jax.config import ConfigError, load_config, load_model_config
from dpa4_jax.elements import MPTRJ_ELEMENTS


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path, check_paths=False)
    if "mptrj" in path.name or "spice" in path.name:  # the paper's models: Tables S-17, S-18
        assert config.model.rcut == 6.0 and config.model.channels == 64 and config.optimizer.decay_type == "cosine"


def test_mptrj_type_map():
    config = load_model_config(ROOT / "configs" / "air_mptrj.yaml")
    assert len(config.type_map) == 89 and config.type_map == MPTRJ_ELEMENTS
    assert not {"Po", "At", "Rn", "Fr", "Ra"} & set(config.type_map) and config.type_map[-1] == "Pu"


@pytest.mark.parametrize("body, message", [
    ("model:\n  chanels: 64\n", r"bad\.yaml: unknown key\(s\) model\.chanels"),
    ("model:\n  channels: sixty\n", r"bad\.yaml: model\.channels: expected an integer"),
    ("model:\n  type_map: [H, Xx]\n", r"bad\.yaml: model\.type_map: unknown element symbol 'Xx'"),
    ("model:\n  lmax: 2\n  mmax: 3\n", r"bad\.yaml: model\.mmax"),
    ("model:\n  env_exp: [7]\n", r"bad\.yaml: model\.env_exp: expected 2 entries"),
    ("model:\n  lmax: 2\n  kmax: 3\n", r"bad\.yaml: model\.kmax: need kmax <= lmax"),
    ("model:\n  so3_readout: gated\n", r"bad\.yaml: model\.so3_readout: 'none', 'glu' or 'mlp'"),
    ("model:\n  grid_branch: [1, 0, 0]\n", r"bad\.yaml: model\.grid_mlp\[0\], grid_branch\[0\]: node-wise"),
    ("model:\n  grid_branch: [0, -1, 0]\n", r"bad\.yaml: model\.grid_branch: must be non-negative"),
])
def test_mistakes_are_named(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_model_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_model_config(tmp_path / "nope.yaml")
