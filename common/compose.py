"""Compose ``conf/`` with Hydra overrides into a validated :class:`ExperimentConfig`.

Hydra's compose API is used (not ``@hydra.main``) so that every subcommand, the tests and the
Flower apps share one path: YAML + ``key=value`` overrides -> dict -> typed dataclasses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from common.config import ExperimentConfig
from common.errors import ConfigError


def conf_dir() -> Path:
    """The ``conf/`` folder: $FEDMIRA_CONF, else the one beside the installed sources."""
    env = os.environ.get("FEDMIRA_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"No config.yaml in {path}; set FEDMIRA_CONF to fedmira's conf/ folder.")
    return path


def compose_dict(overrides: Sequence[str] = (), config_name: str = "config") -> dict[str, Any]:
    """Resolved config as a plain dict (Hydra errors become :class:`ConfigError`)."""
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
    return data


def compose_config(overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate it."""
    return ExperimentConfig.from_dict(compose_dict(overrides))
