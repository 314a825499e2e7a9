"""``build_strategy``: the strategy named by ``strategy.name``, configured from the run config.

One place maps config to strategy classes, so the ServerApp stays wiring only and a test can
check that every name in ``common.config.STRATEGY_NAMES`` builds.
"""

from __future__ import annotations

from typing import Any, Callable

from fedmira.common.config import ExperimentConfig
from fedmira.common.privacy import SiteLevelLedger
from fedmira.common.secagg import SecAggParams
from fedmira.server.fedadagrad import FedmiraFedAdagrad
from fedmira.server.fedadam import FedmiraFedAdam
from fedmira.server.fedavg import FedmiraFedAvg
from fedmira.server.fedprox import FedmiraFedProx
from fedmira.server.fedyogi import FedmiraFedYogi
from fedmira.server.ffa_lora import FedmiraFFALoRA
from fedmira.server.hetero_svd import FedmiraHeteroSVD
from fedmira.server.secaggplus import SecAggPlusRounds
from fedmira.server.strategy import FedmiraStrategy


def _server_opt(cfg: ExperimentConfig, betas: bool = True) -> dict[str, Any]:
    s = cfg.strategy
    kw: dict[str, Any] = {"eta": s.server_lr, "eta_l": cfg.train.lr, "tau": s.tau}
    return {**kw, "beta_1": s.beta_1, "beta_2": s.beta_2} if betas else kw


# name -> (class, extra constructor arguments from the config)
STRATEGIES: dict[str, tuple[type[FedmiraStrategy], Callable[[ExperimentConfig], dict[str, Any]]]] = {
    "fedavg": (FedmiraFedAvg, lambda cfg: {}),
    "fedprox": (FedmiraFedProx, lambda cfg: {"proximal_mu": cfg.strategy.proximal_mu}),
    "fedadam": (FedmiraFedAdam, _server_opt),
    "fedyogi": (FedmiraFedYogi, _server_opt),
    "fedadagrad": (FedmiraFedAdagrad, lambda cfg: _server_opt(cfg, betas=False)),
    "ffa_lora": (FedmiraFFALoRA, lambda cfg: {}),
    "hetero_svd": (FedmiraHeteroSVD, lambda cfg: {"alpha": cfg.lora.alpha, "max_rank": cfg.lora.r}),
}


def round_settings(cfg: ExperimentConfig) -> Callable[[int], dict[str, Any]]:
    """Return what every training message carries besides the adapter (fedprox adds proximal-mu)."""
    return lambda g: {"lr": cfg.train.lr, "local-steps": cfg.train.steps}


def secagg_rounds(cfg: ExperimentConfig) -> SecAggPlusRounds | None:
    """Return the SecAgg+ stages of ``strategy.secure_aggregation=secaggplus``, else None."""
    s = cfg.strategy
    if s.secure_aggregation == "none":
        return None
    params = SecAggParams(num_shares=s.secagg_num_shares,
                          reconstruction_threshold=s.secagg_reconstruction_threshold,
                          clipping_range=s.secagg_clipping_range,
                          quantization_range=s.secagg_quantization_range,
                          max_weight=s.secagg_max_weight or 1.0)
    return SecAggPlusRounds(params, timeout=s.secagg_timeout_s, seed=cfg.run.seed,
                            auto_weight=s.secagg_max_weight == 0)


def build_strategy(
    cfg: ExperimentConfig, *, round_offset: int = 0, comm_offset: tuple[int, int] = (0, 0),
) -> FedmiraStrategy:
    """Build the configured strategy, resuming after ``round_offset`` committed rounds.

    Parameters
    ----------
    cfg : ExperimentConfig
        The run's config (``strategy.*``, plus ``lora``/``train``/``eval``/``run`` where used).
    round_offset : int
        Rounds already committed (resume).
    comm_offset : tuple of int
        Adapter bytes (up, down) already spent by those rounds, for cumulative accounting.
    """
    s, p = cfg.strategy, cfg.privacy
    cls, extra = STRATEGIES[s.name]
    site_dp = (SiteLevelLedger(noise_multiplier=p.site_noise_multiplier, clip=p.site_clip,
                               delta=p.site_delta, mechanism=p.accountant) if p.site_level else None)
    return cls(
        site_dp=site_dp, secure_mode=p.secure_mode, secagg=secagg_rounds(cfg),
        round_config_fn=round_settings(cfg), round_offset=round_offset, evaluate_every=cfg.eval.every,
        total_rounds=s.rounds, seed=cfg.run.seed, aggregation=s.aggregation, trim_fraction=s.trim_fraction,
        norm_factor=s.norm_factor, comm_offset=comm_offset,
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_sites, min_evaluate_nodes=s.min_evaluate_sites,
        min_available_nodes=s.min_train_sites, **extra(cfg),
    )
