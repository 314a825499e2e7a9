"""The strategy section of the config: new keys, their validation and the per-strategy YAMLs."""

from __future__ import annotations

from typing import Any

import pytest

from fedmira.common.compose import compose_config
from fedmira.common.config import STRATEGY_NAMES, ExperimentConfig, StrategyConfig
from fedmira.common.errors import ConfigError


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_each_strategy_has_a_yaml_with_the_default_schedule(name: str) -> None:
    """conf/strategy/<name>.yaml selects it and keeps fedavg.yaml's schedule (42 sites -> 10%)."""
    cfg = compose_config([f"strategy={name}"])
    assert cfg.strategy.name == name
    assert (cfg.strategy.fraction_train, cfg.strategy.min_train_sites) == (0.1, 2)


def test_site_ranks_compose_from_the_command_line() -> None:
    cfg = compose_config(["strategy=hetero_svd", "strategy.site_ranks=[4,8,16]", "lora.r=16"])
    assert cfg.strategy.site_ranks == [4, 8, 16]
    assert ExperimentConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["strategy.name=scaffold"], "strategy.name"),
        (["strategy.aggregation=mode"], "strategy.aggregation"),
        (["strategy.trim_fraction=0.5"], "strategy.trim_fraction"),
        (["strategy.norm_factor=0.5"], "strategy.norm_factor"),
        (["strategy.norm_factor=-1"], "strategy.norm_factor"),
        (["strategy.round_timeout_s=0"], "strategy.round_timeout_s"),
        (["strategy.byte_budget_mb=-1"], "strategy.byte_budget_mb"),
        (["strategy.transport_dtype=int8"], "strategy.transport_dtype"),
        (["strategy.proximal_mu=-0.1"], "strategy.proximal_mu"),
        (["strategy.server_lr=0"], "strategy.server_lr"),
        (["strategy.beta_2=1.5"], "strategy.beta_2"),
        (["strategy.tau=0"], "strategy.tau"),
        (["strategy.site_ranks=[4,8]"], "strategy.site_ranks"),  # needs hetero_svd
        (["strategy=hetero_svd", "strategy.site_ranks=[4,16]"], "strategy.site_ranks"),  # > lora.r
        (["strategy=hetero_svd", "strategy.site_ranks=[0]"], "strategy.site_ranks"),
        (["strategy=hetero_svd", "strategy.aggregation=median"], "strategy.aggregation"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_strategy_values_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert field in str(info.value)


def test_every_strategy_key_has_a_help_text() -> None:
    import dataclasses

    for f in dataclasses.fields(StrategyConfig):
        text: Any = f.metadata.get("help", "")
        assert len(text) > 15, f.name
