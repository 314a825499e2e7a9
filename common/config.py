"""Typed, validated configuration: the single source of truth for a run.

The config path is: Hydra YAML (``conf/``) -> :class:`ExperimentConfig` (validated here) ->
flat Flower run config (:meth:`ExperimentConfig.to_run_config`) -> :class:`ExperimentConfig`
again inside the Flower apps (:meth:`ExperimentConfig.from_run_config`).

Every field carries a help text; every ``__post_init__`` raises :class:`ConfigError` naming the
field (as ``section.field``), the bad value and what is allowed, so a wrong override fails at
start-up with a message that says how to fix it, not deep inside a training round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from fedmira.common.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: A config section (a dataclass) built by :func:`_build`.
_Section = TypeVar("_Section", bound="DataclassInstance")

MODEL_EMBEDDED = "embedded:smollm2-135m"
MODEL_TINY = "tiny-random"


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(
        f"Invalid config value `{section}.{name}` = {value!r}: {allowed}. "
        f"Fix it in the YAML under conf/ or override it, e.g. `{section}.{name}=...`."
    )


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, name, value, f"must be one of {', '.join(choices)}")


def _check_range(
    section: str, name: str, value: float, lo: float | None = None, hi: float | None = None,
    lo_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(section, name, value, "must be a number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(section, name, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(section, name, value, f"must be <= {hi}")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and where to run it."""

    name_or_path: str = _help(
        "Base model: `embedded:smollm2-135m` (ships with the install), `tiny-random` (tests), a "
        "local Hugging Face folder, a hub id already in the local cache, or a .gguf file.",
        MODEL_EMBEDDED,
    )
    gguf_file: str = _help("GGUF file name inside `name_or_path` when that is a folder.", "")
    device: str = _help("auto | cpu | cuda | cuda:N | mps. `auto` takes CUDA, then MPS, then CPU.", "auto")
    dtype: str = _help("auto | float32 | bfloat16 | float16. `auto`: bf16 on GPU, fp32 on CPU.", "auto")
    autocast: str = _help(
        "auto | bfloat16 | off: bf16 autocast of matmuls over fp32 weights in training, loss and "
        "generation. `auto`: on for CUDA with bf16 and for CPUs with AVX512-BF16/AMX, off "
        "elsewhere and for 16-bit weights.", "auto")
    cache_dir: str = _help(
        "Where converted models are cached (empty: $FEDMIRA_CACHE or ~/.cache/fedmira).", ""
    )
    seed: int = _help("Seed of the random initialisation of `tiny-random` models.", 0)
    quantization: str = _help(
        "none | nf4 | int8: load the frozen base model in 4-bit NF4 (QLoRA: bf16 compute, double "
        "quantization) or 8-bit with bitsandbytes (`pip install 'fedmira[qlora]'`) and train LoRA on "
        "top; only the LoRA tensors travel, as without it. Needs a Hugging Face folder (not a "
        ".gguf file); built for CUDA, also runs on CPU with bitsandbytes >= 0.45.", "none")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            _fail("model", "name_or_path", self.name_or_path, "must name a model")
        dev = self.device
        if not (dev in ("auto", "cpu", "mps", "cuda") or dev.startswith("cuda:")):
            _fail("model", "device", dev, "must be auto, cpu, cuda, cuda:N or mps")
        _check_choice("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("model", "autocast", self.autocast, ("auto", "bfloat16", "off"))
        _check_choice("model", "quantization", self.quantization, QUANTIZATIONS)
        if self.quantization != "none" and self.device == "mps":
            _fail("model", "quantization", self.quantization,
                  "bitsandbytes has no Apple MPS kernels; use model.device=cpu or cuda, or quantization=none")
        if self.quantization != "none" and (self.name_or_path.endswith(".gguf") or self.gguf_file):
            _fail("model", "quantization", self.quantization,
                  "quantizes a Hugging Face safetensors folder, and a .gguf file is already quantized in "
                  "its own format; convert it to a folder (save_pretrained) or use the embedded model")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter shape: the only weights that are trained and that leave a hospital."""

    r: int = _help("Rank of the LoRA update; higher is more expressive and more bytes per round.", 8)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", 16)
    dropout: float = _help("Dropout on the LoRA input during training.", 0.05)
    target_modules: list[str] = _help(
        "Names of the linear layers that get adapters (Llama: q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj).",
        ["q_proj", "v_proj"],
    )

    def __post_init__(self) -> None:
        _check_range("lora", "r", self.r, 1, 1024)
        _check_range("lora", "alpha", self.alpha, 0, lo_open=True)
        _check_range("lora", "dropout", self.dropout, 0.0, 0.9)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _fail("lora", "target_modules", self.target_modules, "must be a non-empty list of module names")


@dataclass(frozen=True)
class DataConfig:
    """Where the reports come from and how each becomes a prompt."""

    path: str = _help(
        "Report file (JSONL, canonical CSV or the IU/Open-i CSV). Empty: the embedded synthetic "
        "multicenter corpus, generated deterministically.",
        "",
    )
    format: str = _help("auto | jsonl | csv | iu. `auto` decides by extension and CSV header.", "auto")
    policy: str = _help("skip: drop bad rows and report them; fail: stop at the first bad row.", "skip")
    template: str = _help(
        "Prompt: `site_aware` (site, modality, body part, exam), `plain`, or `site_aware_rag` "
        "(site_aware plus the `neighbors` most similar prior reports of the same hospital).",
        "site_aware")
    neighbors: int = _help(
        "site_aware_rag: prior cases (findings + impression) retrieved from the site's own "
        "reports into each prompt; in training never the report itself nor its patient's.", 2)
    retriever: str = _help(
        "site_aware_rag: how prior cases are found: `tfidf` (scikit-learn TF-IDF cosine) or "
        "`minilm` (all-MiniLM-L6-v2 sentence embeddings).", "tfidf")
    neighbor_order: str = _help(
        "site_aware_rag: `similarity` (most similar prior case first) or `consensus` (of the "
        "`neighbor_pool` most similar, the cases whose impressions agree most with the others', "
        "similarity-weighted ROUGE-L, first).", "similarity")
    neighbor_pool: int = _help("site_aware_rag with neighbor_order=consensus: candidates ranked "
                               "before the `neighbors` best are kept (at least `neighbors`).", 8)
    neighbor_tokens: int = _help("site_aware_rag: each prior case's findings and impression are "
                                 "cut to this many tokens.", 48)
    preamble: str = _help("System turn: `full` (names the task) or `short` (~10 tokens fewer per "
                          "example); either replaces the chat template's generic assistant prompt.", "full")
    max_length: int = _help("Max prompt+target tokens; findings are shortened first, never the target.", 256)
    max_target_tokens: int = _help("Max impression tokens kept as the training target.", 96)
    max_chars: int = _help(
        "Rows whose findings or impression exceed this many characters are rejected.", 20000)
    synthetic_sites: int = _help("Hospitals in the embedded synthetic corpus.", 42)
    synthetic_reports: int = _help("Reports in the embedded synthetic corpus (all sites).", 4200)
    synthetic_seed: int = _help("Seed of the synthetic corpus.", 7)

    def __post_init__(self) -> None:
        _check_choice("data", "format", self.format, ("auto", "jsonl", "csv", "iu"))
        _check_choice("data", "policy", self.policy, ("skip", "fail"))
        _check_choice("data", "template", self.template, ("site_aware", "plain", "site_aware_rag"))
        _check_range("data", "neighbors", self.neighbors, 0, 64)
        _check_choice("data", "retriever", self.retriever, ("tfidf", "minilm"))
        _check_choice("data", "neighbor_order", self.neighbor_order, ("similarity", "consensus"))
        _check_range("data", "neighbor_pool", self.neighbor_pool, 0, 256)
        _check_range("data", "neighbor_tokens", self.neighbor_tokens, 4, 4096)
        _check_choice("data", "preamble", self.preamble, ("full", "short"))
        _check_range("data", "max_length", self.max_length, 16, 8192)
        _check_range("data", "max_target_tokens", self.max_target_tokens, 4, self.max_length - 8)
        _check_range("data", "max_chars", self.max_chars, 16)
        _check_range("data", "synthetic_sites", self.synthetic_sites, 1, 1000)
        _check_range("data", "synthetic_reports", self.synthetic_reports, self.synthetic_sites)


@dataclass(frozen=True)
class PartitionConfig:
    """How pooled reports are split into simulated hospitals and train/val/test."""

    method: str = _help(
        "natural: by `site_id`; iid: shuffled equal shares; dirichlet: label skew (alpha, "
        "label_key); quantity: long-tailed site sizes (alpha); template: IU pseudo-sites by exam "
        "template (the reporting workflow).",
        "natural",
    )
    num_sites: int = _help("Simulated hospitals (iid: exactly; natural: 0 keeps every site).", 0)
    external_sites: int = _help("Whole sites held out as the external test set (never trained on).", 0)
    val_fraction: float = _help("Share of each site's reports for validation.", 0.1)
    test_fraction: float = _help("Share of each site's reports for the internal test set.", 0.1)
    seed: int = _help("Seed of the split; part of the locked config.", 42)
    max_reports_per_site: int = _help("Cap per site after splitting (0: no cap); for quick runs.", 0)
    alpha: float = _help("Dirichlet concentration for dirichlet/quantity (0.1 very skewed, 100 ~ iid).", 0.5)
    label_key: str = _help("What dirichlet skews: modality | body_part | normal.", "modality")
    min_site_reports: int = _help(
        "template: smallest template kept as its own site (num_sites=0); dirichlet/quantity: "
        "smallest site size.", 10)

    def __post_init__(self) -> None:
        _check_choice("partition", "method", self.method,
                      ("natural", "iid", "dirichlet", "quantity", "template"))
        _check_range("partition", "alpha", self.alpha, 0.0, 1e6, lo_open=True)
        if not math.isfinite(self.alpha):
            _fail("partition", "alpha", self.alpha, "must be a finite number")
        _check_choice("partition", "label_key", self.label_key, ("modality", "body_part", "normal"))
        _check_range("partition", "min_site_reports", self.min_site_reports, 1)
        _check_range("partition", "num_sites", self.num_sites, 0, 10000)
        _check_range("partition", "external_sites", self.external_sites, 0, 10000)
        _check_range("partition", "val_fraction", self.val_fraction, 0.0, 0.5)
        _check_range("partition", "test_fraction", self.test_fraction, 0.0, 0.5)
        _check_range("partition", "max_reports_per_site", self.max_reports_per_site, 0)
        if self.method in ("iid", "dirichlet", "quantity") and self.num_sites < 1:
            _fail("partition", "num_sites", self.num_sites, f"must be >= 1 with method={self.method}")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation at one site (one round, or a whole centralized run)."""

    steps: int = _help("Optimizer steps per round at each site (centralized: in total).", 4)
    epochs: float = _help(
        "Local epochs per round instead of `steps` (0: use steps): each site takes "
        "ceil(epochs x its training reports / (batch_size x grad_accum)) steps, so sites spend "
        "compute in proportion to their data; centralized: epochs over the pooled reports.", 0.0)
    batch_size: int = _help("Reports per micro-batch.", 4)
    grad_accum: int = _help("Micro-batches per optimizer step.", 1)
    lr: float = _help("Peak learning rate of AdamW.", 5e-4)
    weight_decay: float = _help("AdamW weight decay on the LoRA weights.", 0.0)
    warmup_steps: int = _help("Linear warm-up steps.", 0)
    warmup_ratio: float = _help(
        "Linear warm-up over this fraction of the run's steps instead of warmup_steps (each site "
        "of its own run: with train.epochs a small site warms up over its few steps rather than "
        "staying in a fixed-length warm-up the whole run).", 0.0)
    schedule: str = _help(
        "constant | linear | cosine decay after warm-up, over the whole run (federated: rounds x "
        "steps per round; the schedule continues across rounds, it does not restart).", "constant")
    keep_optimizer_state: bool = _help(
        "Federated: each site keeps its AdamW moments between rounds (in its own node state, "
        "never sent) instead of starting AdamW afresh every round.", False)
    group_by_length: bool = _help(
        "Batches of examples of similar length (seeded; less padding, more tokens/s).", False)
    max_grad_norm: float = _help("Clip the global gradient norm (0: off).", 1.0)
    seed: int = _help("Seed of batching, dropout and initialisation.", 0)
    threads: int = _help("torch CPU threads (0: leave torch's default).", 0)
    gradient_checkpointing: bool = _help(
        "Recompute each decoder block's activations in the backward pass instead of keeping them: "
        "less GPU memory for long reports or large models, about a third more compute; the "
        "gradients are the same. Not with privacy.enabled.", False)
    devices: int = _help(
        "Data-parallel training processes at a site: 1 (one process), N (one per GPU on CUDA, "
        "gloo processes on CPU) or 0 (every visible GPU; 1 without CUDA). Each optimizer step's "
        "rows are split over the processes and the gradients summed, so the adapter is the one "
        "a single process gives up to reduction order (exactly so with lora.dropout=0). Not "
        "with privacy.enabled.", 1)

    def __post_init__(self) -> None:
        _check_range("train", "steps", self.steps, 1)
        _check_range("train", "epochs", self.epochs, 0.0, 1000.0)
        if not math.isfinite(self.epochs):
            _fail("train", "epochs", self.epochs, "must be a finite number of epochs (0: use train.steps)")
        _check_range("train", "batch_size", self.batch_size, 1)
        _check_range("train", "grad_accum", self.grad_accum, 1)
        _check_range("train", "lr", self.lr, 0.0, 1.0, lo_open=True)
        _check_range("train", "weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("train", "warmup_steps", self.warmup_steps, 0)
        _check_range("train", "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            _fail("train", "warmup_ratio", self.warmup_ratio,
                  "set either train.warmup_steps or train.warmup_ratio, not both (the other to 0)")
        _check_choice("train", "schedule", self.schedule, ("constant", "linear", "cosine"))
        _check_range("train", "max_grad_norm", self.max_grad_norm, 0.0)
        _check_range("train", "threads", self.threads, 0, 1024)
        _check_range("train", "devices", self.devices, 0, 64)


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings for impressions."""

    max_new_tokens: int = _help("Longest impression generated, in tokens.", 64)
    num_beams: int = _help("1: greedy; >1: beam search.", 1)
    batch_size: int = _help("Reports generated together (left padding, KV cache).", 8)

    def __post_init__(self) -> None:
        _check_range("generate", "max_new_tokens", self.max_new_tokens, 1, 4096)
        _check_range("generate", "num_beams", self.num_beams, 1, 32)
        _check_range("generate", "batch_size", self.batch_size, 1)


QUANTIZATIONS = ("none", "nf4", "int8")
STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ffa_lora", "hetero_svd")
AGGREGATIONS = ("mean", "median", "trimmed_mean")
TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")
SECURE_AGGREGATIONS = ("none", "secaggplus")
#: ``privacy.clipping``: how DP-SGD clips and noises a step (common/privacy.py, the same mechanism).
CLIPPINGS = ("flat", "opacus")


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation, robustness, communication and round schedule."""

    name: str = _help(
        "Aggregation algorithm. fedavg: example-weighted mean of the LoRA tensors. fedprox: "
        "fedavg plus a proximal term (proximal_mu) at the sites. fedadam | fedyogi | fedadagrad: "
        "a server optimizer (server_lr, beta_1, beta_2, tau) on the mean adapter delta. "
        "ffa_lora: A frozen at its seeded init, only B trained and sent (exact averaging, about "
        "half the upload). hetero_svd: exact weighted sum of the updates B·A of sites training at "
        "their own ranks (site_ranks), each sent back its best rank-r_k part.",
        "fedavg",
    )
    rounds: int = _help("Federated rounds.", 3)
    fraction_train: float = _help("Share of available sites sampled for training each round.", 1.0)
    min_train_sites: int = _help("A round fails unless at least this many sites reply.", 1)
    fraction_evaluate: float = _help("Share of sites sampled for federated evaluation.", 1.0)
    min_evaluate_sites: int = _help("Federated evaluation needs at least this many replies.", 1)
    proximal_mu: float = _help(
        "fedprox: weight mu of the proximal term (mu/2)·||w - w_global||² on the adapter at each "
        "site; keeps sites with skewed data near the global adapter (0: plain fedavg).", 0.01)
    server_lr: float = _help(
        "fedadam/fedyogi/fedadagrad: server learning rate (eta) on the aggregated adapter delta.", 0.01)
    beta_1: float = _help("fedadam/fedyogi: decay of the server's first moment (momentum).", 0.9)
    beta_2: float = _help("fedadam/fedyogi: decay of the server's second moment.", 0.99)
    tau: float = _help(
        "fedadam/fedyogi/fedadagrad: adaptivity epsilon added to sqrt(v); larger behaves more "
        "like plain SGD on the deltas.", 1e-3)
    site_ranks: list[int] = _help(
        "hetero_svd: LoRA rank of each simulated site, cycled over the sites in order (e.g. "
        "[4, 8, 16]: site 1 trains at 4, site 2 at 8, ...); each <= lora.r, the global rank. "
        "Empty: every site at lora.r. A deployed site's node config `lora-rank` overrides it.",
        [],
    )
    aggregation: str = _help(
        "mean: example-weighted mean; median: coordinate-wise median; trimmed_mean: mean "
        "after dropping trim_fraction of the replies at each end, per coordinate (median and "
        "trimmed_mean are unweighted: a site's size buys no influence). hetero_svd needs mean.",
        "mean",
    )
    trim_fraction: float = _help("trimmed_mean: share of replies dropped at each end, in [0, 0.5).", 0.1)
    norm_factor: float = _help(
        "Reject a reply whose update norm exceeds norm_factor x the median update norm of the "
        "other replies (needs >= 2 replies; 0: off).", 10.0)
    round_timeout_s: float = _help(
        "Seconds the server waits for a round's replies; sites that have not answered by then "
        "are left out of that round and logged.", 3600.0)
    byte_budget_mb: float = _help(
        "Communication budget in MB (10^6 bytes; adapters up and down, all sites, cumulative). "
        "Warns at 80% and stops the run cleanly after the round that exceeds it (0: no budget).",
        0.0)
    transport_dtype: str = _help(
        "Precision of the adapters sites send: float32 | bfloat16 | float16 (16 bits halve the "
        "upload; the server aggregates in float32). bfloat16 travels as its raw bits (uint16), "
        "since NumPy, which Flower serialises with, has no bfloat16.", "float32")
    secure_aggregation: str = _help(
        "none | secaggplus. secaggplus: SecAgg+ (Bell et al. 2020) on the Message API: each site "
        "masks its quantized, example-weighted adapter, so the coordinator learns only the sum "
        "over the sites that survive the round (see the README's privacy section). Needs "
        "aggregation=mean, no privacy.site_level and not hetero_svd; norm-outlier rejection is "
        "off, since no single update is visible; transport_dtype does not apply (quantized).",
        "none")
    secagg_num_shares: int = _help(
        "SecAgg+: sites each site shares its secrets with, itself included (odd, >= 3). More: "
        "more dropouts survived, more key bytes per site.", 3)
    secagg_reconstruction_threshold: int = _help(
        "SecAgg+: shares that rebuild a secret, in [2, num_shares - 1]. It takes this many "
        "colluding sites (with the coordinator) to unmask one site; a round survives while "
        "every site keeps this many neighbours.", 2)
    secagg_clipping_range: float = _help(
        "SecAgg+: every adapter value (after weighting) must lie in [-c, c]; a site holding a "
        "larger one fails its round with an error saying so. Smaller: less quantization error.",
        2.0)
    secagg_quantization_range: int = _help(
        "SecAgg+: integer levels over [-c, c]. Error per value <= 2c x sites / (levels x sum of "
        "weights); at most 2**32 / levels - 1 sites per round.", 2**24)
    secagg_max_weight: float = _help(
        "SecAgg+: largest example count a site may report (its weight is count / max_weight). "
        "0: the largest count the round's sites advertise at key exchange (the best precision).",
        0.0)
    secagg_timeout_s: float = _help(
        "SecAgg+: seconds the server waits for each key-exchange or unmask stage; the training "
        "stage waits round_timeout_s.", 300.0)

    def __post_init__(self) -> None:
        _check_choice("strategy", "name", self.name, STRATEGY_NAMES)
        _check_range("strategy", "rounds", self.rounds, 1, 100000)
        _check_range("strategy", "fraction_train", self.fraction_train, 0.0, 1.0, lo_open=True)
        _check_range("strategy", "min_train_sites", self.min_train_sites, 1)
        _check_range("strategy", "fraction_evaluate", self.fraction_evaluate, 0.0, 1.0)
        _check_range("strategy", "min_evaluate_sites", self.min_evaluate_sites, 0)
        self._check_optimizer()
        self._check_robustness()
        _check_range("strategy", "round_timeout_s", self.round_timeout_s, 0.0, lo_open=True)
        _check_range("strategy", "byte_budget_mb", self.byte_budget_mb, 0.0)
        _check_choice("strategy", "transport_dtype", self.transport_dtype, TRANSPORT_DTYPES)
        if self.site_ranks and self.name != "hetero_svd":
            _fail("strategy", "site_ranks", self.site_ranks,
                  "per-site ranks need strategy.name=hetero_svd (other strategies average "
                  "same-shaped adapters); use strategy=hetero_svd or site_ranks=[]")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.site_ranks):
            _fail("strategy", "site_ranks", self.site_ranks, "must be a list of integers >= 1")
        self._check_secagg()

    def _check_optimizer(self) -> None:
        _check_range("strategy", "proximal_mu", self.proximal_mu, 0.0)
        _check_range("strategy", "server_lr", self.server_lr, 0.0, lo_open=True)
        _check_range("strategy", "beta_1", self.beta_1, 0.0, 1.0)
        _check_range("strategy", "beta_2", self.beta_2, 0.0, 1.0)
        _check_range("strategy", "tau", self.tau, 0.0, lo_open=True)

    def _check_secagg(self) -> None:
        _check_choice("strategy", "secure_aggregation", self.secure_aggregation, SECURE_AGGREGATIONS)
        if self.secure_aggregation == "none":
            return
        if self.name == "hetero_svd":
            _fail("strategy", "secure_aggregation", self.secure_aggregation,
                  "hetero_svd needs every site's own update B·A to build the exact sum, and a "
                  "masked sum of factors of different ranks has no meaning; use another strategy "
                  "(e.g. ffa_lora, whose averaging is exact too) or secure_aggregation=none")
        if self.aggregation != "mean":
            _fail("strategy", "secure_aggregation", self.secure_aggregation,
                  f"aggregation={self.aggregation} needs every site's values one by one, which "
                  "SecAgg+ hides by design; use aggregation=mean (rejecting a poisoned update is "
                  "then the sites' and the allow-list's job) or secure_aggregation=none")
        _check_range("strategy", "secagg_max_weight", self.secagg_max_weight, 0.0)
        _check_range("strategy", "secagg_timeout_s", self.secagg_timeout_s, 0.0, lo_open=True)
        from fedmira.common.secagg import SecAggParams  # lazy: flwr's crypto only when used

        try:
            SecAggParams(num_shares=self.secagg_num_shares,
                         reconstruction_threshold=self.secagg_reconstruction_threshold,
                         clipping_range=self.secagg_clipping_range,
                         quantization_range=self.secagg_quantization_range,
                         max_weight=self.secagg_max_weight or 1.0)
        except (TypeError, ValueError) as exc:  # names the field as secagg.<name>
            name = str(exc).split(" ", 1)[0].removeprefix("secagg.")
            _fail("strategy", f"secagg_{name}", getattr(self, f"secagg_{name}", None), str(exc))

    def _check_robustness(self) -> None:
        _check_choice("strategy", "aggregation", self.aggregation, AGGREGATIONS)
        _check_range("strategy", "trim_fraction", self.trim_fraction, 0.0, 0.5)
        if self.trim_fraction >= 0.5:
            _fail("strategy", "trim_fraction", self.trim_fraction, "must be < 0.5")
        _check_range("strategy", "norm_factor", self.norm_factor, 0.0)
        if 0 < self.norm_factor <= 1:
            _fail("strategy", "norm_factor", self.norm_factor,
                  "must be 0 (off) or > 1 (a factor above the others' median update norm)")
        if self.name == "hetero_svd" and self.aggregation != "mean":
            _fail("strategy", "aggregation", self.aggregation,
                  "hetero_svd sums the updates B·A exactly and supports only mean")


PRIVACY_UNITS = ("record", "patient")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: DP-SGD at each site (record/patient level) and site-level DP.

    Record-level DP-SGD protects each report (or each patient, ``unit=patient``) of a site's
    data in the adapters that site sends; site-level DP protects each hospital's whole
    contribution in the global adapter. See the README's Privacy section for what each does
    and does not protect against.
    """

    enabled: bool = _help(
        "Record-level DP-SGD with Opacus at every site: per-unit gradient clipping, Gaussian "
        "noise, Poisson sampling, and an accountant that lives with the site across rounds.",
        False,
    )
    unit: str = _help(
        "Privacy unit: `record` (each report) or `patient` (all reports of one patient_id count "
        "as one; every training report needs a patient_id).", "record")
    target_epsilon: float = _help(
        "Solve the noise for this epsilon over the planned rounds x local steps (0: use "
        "`noise_multiplier`). Also the site's budget unless `max_epsilon` is set.", 8.0)
    delta: float = _help("delta of the (epsilon, delta) guarantee; keep it below 1/units.", 1e-5)
    noise_multiplier: float = _help(
        "Noise std / clip norm when `target_epsilon` is 0.", 1.0)
    max_grad_norm: float = _help("Per-unit gradient clip norm C of DP-SGD.", 1.0)
    max_epsilon: float = _help(
        "Budget: a site stops training once another step would exceed it (0: `target_epsilon`; "
        "with both 0 there is no budget and epsilon is only reported).", 0.0)
    accountant: str = _help("Privacy accountant: `rdp` (Renyi DP) or `prv` (PRV, tighter).", "rdp")
    secure_mode: bool = _help(
        "Production randomness: noise and sampling from the OS's CSPRNG (not reproducible). "
        "Off: seeded from `train.seed` for reproducible research runs.", False)
    clipping: str = _help(
        "How DP-SGD clips and noises a step's per-unit gradients: `flat` (one buffer for every "
        "LoRA tensor: a handful of GPU kernels per step) or `opacus` (Opacus' DPOptimizer, per "
        "tensor). The same mechanism and accounting; `flat` is faster on a GPU.", "flat")
    site_level: bool = _help(
        "Site-level DP at the server: clip each site's adapter update to `site_clip`, average "
        "unweighted, add Gaussian noise; epsilon over sites is reported every round.", False)
    site_clip: float = _help("Clip norm of one site's adapter update (site-level DP).", 1.0)
    site_noise_multiplier: float = _help(
        "Site-level noise std / (site_clip x sampled sites) (site-level DP).", 1.0)
    site_delta: float = _help("delta of site-level DP; keep it below 1/number of sites.", 1e-3)

    def __post_init__(self) -> None:
        _check_choice("privacy", "unit", self.unit, PRIVACY_UNITS)
        _check_choice("privacy", "accountant", self.accountant, ACCOUNTANTS)
        _check_choice("privacy", "clipping", self.clipping, CLIPPINGS)
        _check_range("privacy", "target_epsilon", self.target_epsilon, 0.0)
        _check_range("privacy", "delta", self.delta, 0.0, 1.0, lo_open=True)
        _check_range("privacy", "noise_multiplier", self.noise_multiplier, 0.0)
        _check_range("privacy", "max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        _check_range("privacy", "max_epsilon", self.max_epsilon, 0.0)
        _check_range("privacy", "site_clip", self.site_clip, 0.0, lo_open=True)
        _check_range("privacy", "site_noise_multiplier", self.site_noise_multiplier, 0.0)
        _check_range("privacy", "site_delta", self.site_delta, 0.0, 1.0, lo_open=True)
        if self.enabled and self.target_epsilon == 0 and self.noise_multiplier == 0:
            _fail("privacy", "noise_multiplier", self.noise_multiplier,
                  "must be > 0 when privacy.target_epsilon is 0 (zero noise gives no privacy)")

    @property
    def budget(self) -> float:
        """The site's epsilon budget (0: none)."""
        return self.max_epsilon or self.target_epsilon


@dataclass(frozen=True)
class EvalConfig:
    """Federated evaluation of the global adapter on each site's validation split."""

    every: int = _help("Evaluate every k rounds (0: never; the last round is always evaluated).", 1)
    max_loss_samples: int = _help("Validation reports per site for the loss (0: all).", 16)
    rouge_samples: int = _help("Validation reports per site decoded for ROUGE-L (0: skip).", 2)
    max_new_tokens: int = _help("Decode length for the ROUGE-L sample.", 32)
    batch_size: int = _help("Batch size for validation loss and decoding.", 8)
    final_reports: int = _help(
        "After the last round, the global adapter is scored on this many held-out reports (the "
        "test splits, as `fedmira evaluate` picks them) beside the retrieval and most-frequent "
        "baselines, with 95% CIs, so a run says whether training paid off (0: skip).", 100)
    final_encoder: bool = _help("Also BERTScore and sentence similarity in that final score "
                                "(loads the MiniLM encoder, ~1 min more).", False)

    def __post_init__(self) -> None:
        _check_range("eval", "every", self.every, 0)
        _check_range("eval", "final_reports", self.final_reports, 0)
        _check_range("eval", "max_loss_samples", self.max_loss_samples, 0)
        _check_range("eval", "rouge_samples", self.rouge_samples, 0)
        _check_range("eval", "max_new_tokens", self.max_new_tokens, 1)
        _check_range("eval", "batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class ModeConfig:
    """Simulation on one machine, or deployment over the network."""

    name: str = _help("simulation | deployment.", "simulation")
    backend: str = _help("Simulation backend: ray (Flower's simulation engine).", "ray")
    ray_address: str = _help("Existing Ray cluster to join (empty: start a local one).", "")
    client_cpus: int = _help("CPUs reserved per simulated site (sets how many run at once).", 2)
    client_gpus: float = _help("GPU share per simulated site (0 on CPU machines).", 0.0)
    superlink: str = _help(
        "Deployment: the coordinator's SuperLink as host:port: where `fedmira coordinator` listens "
        "(0.0.0.0:PORT accepts other machines) and the default `--superlink` of `fedmira hospital`. "
        "Only the Fleet API (hospitals) is served there.", "")
    state_db: str = _help(
        "Deployment: the SuperLink's state database (registered node keys, runs), shared by all "
        "runs of this coordinator so hospitals stay connected from one run to the next; empty: "
        "RUN.OUT_DIR/coordinator/superlink.db. One coordinator at a time uses it.", "")
    control_port: int = _help(
        "Deployment: port of the operator's address, 127.0.0.1 only (Control API for the `flwr` "
        "CLI, Runtime API for the ServerApp); 0: a free port, written to RUN_DIR/.flwr/config.toml.", 0)

    def __post_init__(self) -> None:
        _check_choice("mode", "name", self.name, ("simulation", "deployment"))
        _check_choice("mode", "backend", self.backend, ("ray",))
        _check_range("mode", "client_cpus", self.client_cpus, 1)
        _check_range("mode", "client_gpus", self.client_gpus, 0.0)
        _check_range("mode", "control_port", self.control_port, 0, 65535)


@dataclass(frozen=True)
class RunConfig:
    """Naming, output and resume of a run."""

    name: str = _help(
        "Experiment name; runs of one name must share the locked config. Empty: named after the "
        "data and the partition method (e.g. `synthetic-natural`, `indiana_reports-natural`).", "")
    out_dir: str = _help("Folder holding run folders.", "outputs")
    resume: str = _help("Run folder to resume after its last completed round (empty: new run).", "")
    allow_lock_change: bool = _help(
        "Permit a run whose locked part (split, eval set, prompt, sites) differs from the one "
        "recorded for this experiment name. Results are then not comparable.",
        False,
    )
    seed: int = _help("Global seed (server-side sampling of sites).", 0)
    dir: str = _help("This run's folder; set by the launcher, not by hand.", "")
    tensorboard: bool = _help("Also write per-round metrics as TensorBoard events (RUN_DIR/tb).", False)


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole configuration of a fedmira run."""

    mode: ModeConfig = field(default_factory=ModeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        too_big = [r for r in self.strategy.site_ranks if r > self.lora.r]
        if too_big:
            _fail("strategy", "site_ranks", self.strategy.site_ranks,
                  f"each rank must be <= lora.r={self.lora.r}, the rank of the global adapter; "
                  f"raise lora.r (e.g. lora.r={max(too_big)}) or lower the site ranks")
        if self.privacy.site_level and self.strategy.aggregation != "mean":
            _fail("strategy", "aggregation", self.strategy.aggregation,
                  "must be `mean` with privacy.site_level (the DP mean is clipped and unweighted)")
        if self.privacy.enabled and self.train.group_by_length:
            _fail("train", "group_by_length", True,
                  "DP-SGD draws each step's batch by Poisson sampling (the privacy accountant "
                  "assumes it), so batches cannot be grouped by length; set "
                  "train.group_by_length=false with privacy.enabled")
        if self.privacy.enabled and self.train.gradient_checkpointing:
            _fail("train", "gradient_checkpointing", True,
                  "the recomputed forward pass would run Opacus' per-sample hooks a second time, so "
                  "DP-SGD's per-sample gradients would be wrong; set train.gradient_checkpointing=false "
                  "with privacy.enabled (use a smaller train.batch_size with train.grad_accum instead)")
        if self.privacy.enabled and self.train.devices != 1:
            _fail("train", "devices", self.train.devices,
                  "DP-SGD clips each unit's gradient and adds the noise once per step in one "
                  "process; split over processes, a patient's rows could be clipped apart and the "
                  "noise added twice. Set train.devices=1 with privacy.enabled")
        if self.privacy.site_level and self.strategy.secure_aggregation != "none":
            _fail("privacy", "site_level", True,
                  "site-level DP clips each site's update at the server, which SecAgg+ hides "
                  "from it; keep strategy.secure_aggregation and use record-level DP-SGD at the "
                  "sites instead (privacy.enabled=true, noise added before masking), or set "
                  "strategy.secure_aggregation=none")
        if self.privacy.site_level and self.strategy.name == "hetero_svd":
            _fail("privacy", "site_level", True,
                  "site-level DP clips same-shaped adapter updates and cannot be combined with "
                  "strategy=hetero_svd (sites send adapters of different ranks); use another strategy")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a nested mapping (e.g. a resolved Hydra config), rejecting unknown keys."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> ExperimentConfig:
        """Copy with whole sections replaced (each re-validated by its constructor)."""
        return dataclasses.replace(self, **sections)

    # ------------------------------------------------------------------ Flower run config
    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's run config: dotted keys, scalar values, lists as JSON strings."""
        flat: dict[str, bool | int | float | str] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, list) else value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_run_config` (used inside the ServerApp and ClientApp)."""
        nested: dict[str, dict[str, Any]] = {}
        for dotted, value in run_config.items():
            section, _, key = str(dotted).partition(".")
            if not key:
                raise ConfigError(
                    f"Run config key `{dotted}` is not of the form section.field; start runs "
                    "through `fedmira simulate`, which writes a complete run config."
                )
            nested.setdefault(section, {})[key] = value
        hints = _section_hints()
        for section, values in nested.items():
            for key, value in list(values.items()):
                hint = hints.get(section, {}).get(key)
                if hint is not None and typing.get_origin(hint) is list and isinstance(value, str):
                    try:
                        values[key] = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(
                            f"Run config value `{section}.{key}` = {value!r} is not a JSON list, "
                            f'e.g. \'["q_proj", "v_proj"]\'.'
                        ) from exc
        return cls.from_dict(nested)

    # ------------------------------------------------------------------ locked part
    def locked_part(self) -> dict[str, Any]:
        """Return the settings that make results comparable: split, its seed, eval set, prompt, sites.

        A deployment has no split (each hospital holds its own reports): only the prompt and
        evaluation settings the coordinator sends are locked, not the data source or partition
        keys it never uses.
        """
        prompt = ("template", "max_length", "max_target_tokens", "max_chars")
        source = ("path", "format", "policy", "synthetic_sites", "synthetic_reports", "synthetic_seed")
        evaluation = {k: getattr(self.eval, k) for k in ("max_loss_samples", "rouge_samples")}
        if self.mode.name == "deployment":
            return {"data": {k: getattr(self.data, k) for k in prompt}, "eval": evaluation}
        return {
            "data": {k: getattr(self.data, k) for k in (*source[:3], *prompt, *source[3:])},
            "partition": dataclasses.asdict(self.partition),
            "eval": evaluation,
        }

    def experiment_name(self) -> str:
        """``run.name``, or a name derived from the data source and the partition method."""
        if self.run.name:
            return self.run.name
        source = Path(self.data.path).stem if self.data.path else "synthetic"
        return f"{source}-{self.partition.method}"

    def lock_hash(self) -> str:
        """Short SHA-256 of :meth:`locked_part`."""
        return stable_hash(self.locked_part())

    def config_hash(self) -> str:
        """Short SHA-256 of the whole config except run bookkeeping (name, out_dir, resume)."""
        d = self.to_dict()
        d.pop("run")
        return stable_hash(d)


def stable_hash(obj: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _section_hints() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[f.name]
        out[f.name] = typing.get_type_hints(cls)
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert YAML/run-config scalars to the declared type, or fail naming the field."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config field `{where}` must be a list, got {value!r}.")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"Config field `{where}` must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"Config field `{where}` must be an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"Config field `{where}` must be a number, got {value!r}.")
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"Config field `{where}` must be a string, got {value!r}.")
    return value


def _build(cls: type[_Section], data: Mapping[str, Any], prefix: str) -> _Section:
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config section `{prefix or 'root'}` must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        named = ", ".join(f"`{prefix}.{u}`" if prefix else f"`{u}`" for u in unknown)
        raise ConfigError(
            f"Unknown config key(s) {named} in {where}; known keys: {', '.join(sorted(names))}."
        )
    kwargs: dict[str, Any] = {}
    for name in names & set(data):
        hint = hints[name]
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], where)
        else:
            kwargs[name] = _coerce(data[name], hint, where)
    return cls(**kwargs)


def help_table(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every field, for `--help` output and the README."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(help_table(hints[f.name], key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"config field `{key}` has no default")
        rows.append((key, json.dumps(default), f.metadata.get("help", "")))
    return rows
