"""Memorization audit with canaries (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a synthetic report whose impression carries a random secret (``Follow-up code
482917.``). Planted, repeated, in one site's training data, it lets us ask of a trained adapter:

- **exposure**: how much more likely the model finds the true secret than random candidates.
  With the secret ranked ``rank`` (1 = most likely) among ``n`` candidates plus itself,
  ``exposure = log2(n + 1) - log2(rank)``: 0 bits means no preference, ``log2(n + 1)`` bits
  means the secret is the model's favourite.
- **verbatim extraction**: whether greedy decoding of the canary's prompt writes the secret.

Everything here is a plain function of a model, a tokenizer and reports; ``simulations/audit_cli``
trains the arms (with and without DP) and writes the report. Canaries are synthetic: no real
report is ever used as a canary, and secrets are not logged (only ranks and exposures).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fedmira.common.config import DataConfig
from fedmira.common.prompts import IGNORE_INDEX, encode_example, prompt_ids, target_ids
from fedmira.common.reports import Report

SECRET_DIGITS = 6
_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kelvin", "lumen", "marble", "nickel", "onyx", "prism", "quartz", "raven", "sierra", "topaz")


@dataclass(frozen=True)
class Canary:
    """One planted canary: its report (impression holds the secret) and the secret digits."""

    report: Report
    secret: str


def impression_for(secret: str) -> str:
    """Return the canary impression around a secret (the format the candidates share)."""
    return f"Follow-up code {secret}."


def make_canaries(template: Report, k: int, seed: int) -> list[Canary]:
    """Make ``k`` canaries shaped like ``template`` (site, modality, body part, exam).

    Each has unique random findings and a secret of :data:`SECRET_DIGITS` digits.
    """
    rng = random.Random(seed)
    canaries = []
    for i in range(k):
        words = " ".join(rng.choice(_WORDS) for _ in range(6))
        secret = "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS))
        report = dataclasses.replace(
            template, report_id=f"canary-{seed}-{i}",
            findings=f"Marker study {words}. Structures otherwise unremarkable.",
            impression=impression_for(secret), patient_id=f"canary-patient-{seed}-{i}", labels=())
        canaries.append(Canary(report, secret))
    return canaries


def plant(train: Sequence[Report], canaries: Sequence[Canary], repeats: int, seed: int) -> list[Report]:
    """``train`` with each canary inserted ``repeats`` times at random positions.

    Repeats share the canary's patient_id, so patient-level DP treats them as one unit while
    record-level DP sees ``repeats`` records (its guarantee then degrades by group privacy).
    """
    out = list(train)
    rng = random.Random(seed)
    for canary in canaries:
        for j in range(repeats):
            copy = dataclasses.replace(canary.report, report_id=f"{canary.report.report_id}-{j}")
            out.insert(rng.randrange(len(out) + 1), copy)
    return out


def candidates(secret: str, n: int, seed: int) -> list[str]:
    """``n`` distinct random secrets other than ``secret`` (same length)."""
    rng = random.Random(seed)
    found: set[str] = set()
    while len(found) < n:
        c = "".join(rng.choice("0123456789") for _ in range(len(secret)))
        if c != secret:
            found.add(c)
    return sorted(found)


@torch.no_grad()
def sequence_nll(model: Any, tokenizer: Any, reports: Sequence[Report], data: DataConfig,
                 device: torch.device, batch_size: int = 16) -> list[float]:
    """Compute the summed negative log-likelihood (nats) of each report's impression given its prompt.

    Rows are left-padded so every impression ends at the last position, and the model computes
    logits only for the last ``max target length + 1`` positions (``logits_to_keep``): the
    vocabulary projection over the whole prompt would cost more than the rest of the forward
    pass for a small model with a large vocabulary, and ranking candidates needs only targets.
    """
    model.eval()
    pad = int(tokenizer.pad_token_id)
    examples = [encode_example(r, tokenizer, data.template, data.max_length, data.max_target_tokens)
                for r in reports]
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in chunk], device=device)
        labels = torch.tensor([[IGNORE_INDEX] * (width - len(e.labels)) + e.labels for e in chunk],
                              device=device)
        mask = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in chunk],
                            device=device)
        keep = max(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in chunk) + 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep).logits[:, :-1].float()
        target = labels[:, width - keep + 1 :]
        tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        out.extend(tok.sum(dim=1).tolist())
    return out


@torch.no_grad()
def candidate_nll(model: Any, tokenizer: Any, report: Report, impressions: Sequence[str], data: DataConfig,
                  device: torch.device, batch_size: int = 64) -> list[float]:
    """Compute the summed NLL of each candidate impression after ``report``'s prompt (run once).

    Candidates share the prompt, so its keys and values are computed once and reused (a copy of
    the cache per batch); only the few impression tokens run per candidate. Equal to
    :func:`sequence_nll` on the candidate reports (tested), tens of times faster for a long prompt.
    """
    model.eval()
    target_len = data.max_target_tokens
    targets = [target_ids(dataclasses.replace(report, impression=text), tokenizer, target_len)
               for text in impressions]
    prompt = prompt_ids(report, tokenizer, data.template, data.max_length - max(len(t) for t in targets))
    first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache, last = first.past_key_values, first.logits[:, -1:].float()
    pad = int(tokenizer.pad_token_id)
    out: list[float] = []
    for i in range(0, len(targets), batch_size):
        chunk = targets[i : i + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in chunk], device=device)
        labels = torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for t in chunk], device=device)
        mask = torch.cat([torch.ones(len(chunk), len(prompt), dtype=torch.long, device=device),
                          (labels != IGNORE_INDEX).long()], dim=1)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(chunk))
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=past,
                       use_cache=True).logits.float()
        # token 0 is predicted by the prompt's last position, token j by the candidate's token j-1
        full = torch.cat([last.expand(len(chunk), 1, -1), logits[:, :-1]], dim=1)
        tok = F.cross_entropy(full.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        out.extend(tok.sum(dim=1).tolist())
    return out


def exposure(secret_nll: float, candidate_nll: Sequence[float]) -> tuple[int, float]:
    """(rank of the secret among itself + candidates, exposure in bits); ties count against it."""
    rank = 1 + sum(1 for c in candidate_nll if c <= secret_nll)
    return rank, math.log2(len(candidate_nll) + 1) - math.log2(rank)


def canary_exposure(model: Any, tokenizer: Any, canary: Canary, n_candidates: int, data: DataConfig,
                    device: torch.device, seed: int, batch_size: int = 64) -> dict[str, float | int]:
    """Rank and exposure of one canary's secret among ``n_candidates`` random ones."""
    others = candidates(canary.secret, n_candidates, seed)
    texts = [impression_for(s) for s in [canary.secret, *others]]
    nll = candidate_nll(model, tokenizer, canary.report, texts, data, device, batch_size)
    rank, bits = exposure(nll[0], nll[1:])
    return {"rank": rank, "exposure_bits": bits, "max_bits": math.log2(n_candidates + 1),
            "secret_nll": nll[0]}


def extracted(generated: str, secret: str) -> bool:
    """Whether a generated impression reproduces the secret verbatim (digits, spacing ignored)."""
    return secret in re.sub(r"\D", "", generated)


def matched_digits(generated: str, secret: str) -> int:
    """How many of the secret's digits the generation got right, position by position.

    Verbatim extraction is all-or-nothing; a model that writes the canary's format with 5 of
    6 digits right has still memorized most of the secret, and this shows it.
    """
    digits = re.sub(r"\D", "", generated)
    return max((sum(a == b for a, b in zip(digits[i : i + len(secret)], secret))
                for i in range(max(1, len(digits) - len(secret) + 1))), default=0)
