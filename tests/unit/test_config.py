"""Tests of the typed config, its Hydra YAML under conf/ and the Flower run-config round trip."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from fedmira.common.compose import compose_config, conf_dir
from fedmira.common.config import (
    DataConfig,
    ExperimentConfig,
    LoraConfig,
    TrainConfig,
)
from fedmira.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
# Options that need a value the YAML leaves mandatory (`???`).
EXTRA_OVERRIDES: dict[str, list[str]] = {"model=local_path": ["model.name_or_path=/x"]}


def _default_groups() -> set[str]:
    """Config groups named in the defaults list of conf/config.yaml (`optional` stripped)."""
    doc = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    assert isinstance(doc, dict)
    groups: set[str] = set()
    for entry in doc.get("defaults", []):
        if isinstance(entry, dict):
            (key,) = entry
            groups.add(key.split()[-1].lstrip("/"))
    return groups


def _override_sets() -> list[list[str]]:
    """Every YAML combination to compose: the default, then one per file under conf/<group>/.

    Groups in the defaults list are switched with `group=name`, the others (experiment, debug,
    ...) are added with `+group=name`. Files are globbed, so new configs are tested too.
    """
    groups = _default_groups()
    sets: list[list[str]] = [[]]
    for path in sorted(CONF.glob("*/*.yaml")):
        group, name = path.parent.name, path.stem
        override = f"{group}={name}" if group in groups else f"+{group}={name}"
        sets.append([override, *EXTRA_OVERRIDES.get(override, [])])
    return sets


OVERRIDE_SETS = _override_sets()


def _id(overrides: list[str]) -> str:
    """Readable test id of one override set."""
    return " ".join(overrides) or "default"


def test_discovery_finds_every_yaml_file() -> None:
    """Sanity check of the discovery: one combination per YAML file plus the default."""
    assert len(OVERRIDE_SETS) == 1 + len(list(CONF.glob("*/*.yaml")))
    flat = {o for s in OVERRIDE_SETS for o in s}
    assert {"+experiment=iu_8sites", "+debug=tiny", "model=tiny", "lora=r16_all"} <= flat
    assert conf_dir() == CONF


@pytest.mark.parametrize("overrides", OVERRIDE_SETS, ids=_id)
def test_every_yaml_combination_composes_and_round_trips(overrides: list[str]) -> None:
    """Each combination validates, and the Flower run config converts back to the same config."""
    cfg = compose_config(overrides)
    assert isinstance(cfg, ExperimentConfig)
    run_config = cfg.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert ExperimentConfig.from_run_config(run_config) == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_default_composition_is_the_dataclass_default_except_documented_yaml_choices() -> None:
    """The composed default differs from `ExperimentConfig()` only where conf/ says so."""
    cfg = compose_config()
    default = ExperimentConfig()
    assert cfg.model == default.model
    assert cfg.lora == default.lora
    assert cfg.data == default.data
    assert cfg.train == default.train
    assert cfg.strategy.fraction_train == 0.1 and cfg.strategy.min_train_sites == 2


def test_overlays_apply_their_changes() -> None:
    """`+debug=tiny` switches to the tiny model; `+experiment=iu_8sites` to IU + iid."""
    debug = compose_config(["+debug=tiny"])
    assert debug.model.name_or_path == "tiny-random"
    assert (debug.data.synthetic_sites, debug.data.max_length, debug.train.lr) == (3, 320, 5e-3)
    iu = compose_config(["+experiment=iu_8sites"])
    assert (iu.data.format, iu.partition.method, iu.partition.num_sites, iu.run.name) == (
        "iu", "iid", 8, "iu_8sites")


def test_local_path_model_without_a_path_fails_naming_the_field() -> None:
    """`model=local_path` leaves name_or_path mandatory (`???`): composing alone must say so."""
    with pytest.raises(ConfigError, match="name_or_path"):
        compose_config(["model=local_path"])


# ---------------------------------------------------------------------------- pyproject sync
def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys, as Flower flattens them."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _pyproject_run_config() -> dict[str, Any]:
    """The flattened [tool.flwr.app.config] table of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        doc = tomllib.load(f)
    return _flatten(doc["tool"]["flwr"]["app"]["config"])


def test_pyproject_flower_defaults_match_the_dataclass_defaults_key_for_key() -> None:
    """[tool.flwr.app.config] must equal ExperimentConfig().to_run_config() (keys, values, types)."""
    ours = ExperimentConfig().to_run_config()
    theirs = _pyproject_run_config()
    assert sorted(theirs) == sorted(ours), (
        f"only in pyproject: {sorted(set(theirs) - set(ours))}; "
        f"only in common/config.py: {sorted(set(ours) - set(theirs))}"
    )
    list_keys = _list_keys()
    for key, value in ours.items():
        got = theirs[key]
        if key in list_keys:
            assert isinstance(got, str), f"{key}: lists go into the run config as JSON strings"
            assert json.loads(got) == json.loads(str(value)), key
        else:
            assert got == value and type(got) is type(value), f"{key}: pyproject {got!r} != {value!r}"


def _list_keys() -> set[str]:
    """Dotted run-config keys whose fields are lists (sent as JSON strings)."""
    return {
        f"{section}.{key}"
        for section, values in ExperimentConfig().to_dict().items()
        for key, value in values.items()
        if isinstance(value, list)
    }


def test_pyproject_run_config_builds_the_default_config() -> None:
    """What Flower hands the apps from pyproject alone is the default ExperimentConfig."""
    assert ExperimentConfig.from_run_config(_pyproject_run_config()) == ExperimentConfig()


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["train.lr=-1"], "train.lr"),
        (["train.lr=0"], "train.lr"),
        (["train.lr=fast"], "train.lr"),
        (["lora.r=0"], "lora.r"),
        (["lora.r=2.5"], "lora.r"),
        (["data.template=fancy"], "data.template"),
        (["data.max_target_tokens=300"], "data.max_target_tokens"),
        (["partition=iid", "partition.num_sites=0"], "partition.num_sites"),
        (["privacy=dp", "privacy.target_epsilon=0", "privacy.noise_multiplier=0"],
         "privacy.noise_multiplier"),
        (["privacy.unit=household"], "privacy.unit"),
        (["privacy=site_dp", "strategy.aggregation=median"], "strategy.aggregation"),
        (["privacy=site_dp", "strategy=hetero_svd"], "privacy.site_level"),
        (["model.device=tpu"], "model.device"),
        (["+train.momentum=0.9"], "train.momentum"),
        (["+colour=blue"], "colour"),
        (["train.momentum=0.9"], "momentum"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_values_raise_config_error_naming_the_field(overrides: list[str], field: str) -> None:
    """A bad Hydra override fails at composition with a ConfigError that names the field."""
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert f"{field}" in str(info.value)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TrainConfig(lr=2.0), "train.lr"),
        (lambda: LoraConfig(r=0), "lora.r"),
        (lambda: LoraConfig(target_modules=[]), "lora.target_modules"),
        (lambda: DataConfig(template="chatty"), "data.template"),
        (lambda: ExperimentConfig.from_dict({"train": {"lr": "x"}}), "train.lr"),
        (lambda: ExperimentConfig.from_dict({"train": {"bogus": 1}}), "train.bogus"),
        (lambda: ExperimentConfig.from_dict({"bogus": {}}), "bogus"),
        (lambda: ExperimentConfig.from_run_config({"nodots": 1}), "nodots"),
        (lambda: ExperimentConfig.from_run_config({"lora.target_modules": "not json"}),
         "lora.target_modules"),
    ],
    ids=["lr>1", "r=0", "no-targets", "template", "lr-string", "unknown-field", "unknown-section",
         "run-config-key", "run-config-list"],
)
def test_bad_values_in_python_raise_config_error_naming_the_field(build: Any, field: str) -> None:
    """Dataclasses, from_dict and from_run_config fail with a ConfigError naming the field."""
    with pytest.raises(ConfigError) as info:
        build()
    assert field in str(info.value)


# ---------------------------------------------------------------------------- lock hash
def test_lock_hash_tracks_the_locked_part_only() -> None:
    """Split seed and prompt template change the lock hash; the learning rate does not."""
    base = ExperimentConfig()
    h = base.lock_hash()
    assert len(h) == 16 and h == ExperimentConfig().lock_hash()
    seed = base.replace(partition=dataclasses.replace(base.partition, seed=43))
    template = base.replace(data=dataclasses.replace(base.data, template="plain"))
    lr = base.replace(train=dataclasses.replace(base.train, lr=1e-3))
    assert seed.lock_hash() != h
    assert template.lock_hash() != h
    assert lr.lock_hash() == h
    assert lr.config_hash() != base.config_hash()  # ... though the whole config did change
