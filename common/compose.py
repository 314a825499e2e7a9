"""Compose ``conf/`` with Hydra overrides into a validated :class:`ExperimentConfig`.

Hydra's compose API is used (not ``@hydra.main``) so that every subcommand, the tests and the
Flower apps share one path: YAML + ``key=value`` overrides -> dict -> typed dataclasses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, cast

from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError


def conf_dir() -> Path:
    """Locate the ``conf/`` folder: $FEDMIRA_CONF, else the one beside the installed sources."""
    env = os.environ.get("FEDMIRA_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"No config.yaml in {path}; set FEDMIRA_CONF to fedmira's conf/ folder.")
    return path


def compose_dict(overrides: Sequence[str] = (), config_name: str = "config") -> dict[str, Any]:
    """Compose the resolved config as a plain dict (Hydra errors become :class:`ConfigError`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"Config error: {exc}".strip()) from exc
    assert isinstance(data, dict)
    return cast("dict[str, Any]", data)  # a Hydra config's keys are strings


def compose_config(overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate it."""
    return ExperimentConfig.from_dict(compose_dict(overrides))


#: Keys a resume may change: where and how the run is served, not what it trains.
RESUMABLE_KEYS = ("mode.superlink", "mode.control_port", "mode.ray_address", "mode.client_cpus",
                  "mode.client_gpus")
_RESUME_KEYS = ("run.resume", "+run.resume")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _override_key(override: str) -> str:
    """``a.b=1`` / ``+a.b=1`` / ``++a.b=1`` -> ``a.b`` (group choices like ``data=iu`` -> ``data``)."""
    return override.split("=", 1)[0].lstrip("+~")


def given_keys(overrides: Sequence[str], base: Sequence[str] = ()) -> tuple[set[str], dict[str, Any]]:
    """Return the leaf keys ``overrides`` set on top of ``base``, and the flat composed config.

    The keys are those a plain ``key=value`` names and those a group choice or an experiment
    overlay changes.
    """
    before = _flat(compose_dict(list(base)))
    after = _flat(compose_dict([*base, *overrides]))
    named = {_override_key(o) for o in overrides}
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return changed | {k for k in named if k in after}, after


def resume_config(recorded: ExperimentConfig, overrides: Sequence[str], base: Sequence[str] = (),
                  where: str = "") -> ExperimentConfig:
    """Check the user's ``overrides`` against a resumed run's recorded config and apply them.

    Only the keys the user gave are compared (not every default the recorded run had changed);
    :data:`RESUMABLE_KEYS` take the given value, any other difference is refused, naming the
    key, the recorded and the given value.
    """
    overrides = [o for o in overrides if not o.startswith(_RESUME_KEYS)]
    if not overrides:
        return recorded
    keys, given = given_keys(overrides, base)  # one composition with the overrides, not two
    old = _flat(recorded.to_dict())
    moved: dict[str, Any] = {}
    refused: list[str] = []
    for key in sorted(keys):
        if key.startswith("run.") or old.get(key) == given.get(key):
            continue
        if key in RESUMABLE_KEYS:
            moved[key] = given.get(key)
        else:
            refused.append(f"{key} (recorded {old.get(key)!r}, given {given.get(key)!r})")
    if refused:
        shown = "; ".join(refused[:6]) + (" ..." if len(refused) > 6 else "")
        raise ConfigError(f"run.resume={where} continues the recorded config; these overrides change it: "
                          f"{shown}. Drop them, or start a new run.")
    if not moved:
        return recorded
    doc = recorded.to_dict()
    for key, value in moved.items():
        section, field = key.split(".", 1)
        doc[section][field] = value
    return ExperimentConfig.from_dict(doc)
