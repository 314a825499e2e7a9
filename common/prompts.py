"""Prompts as in the study: findings -> impression, optionally site- and exam-aware.

Three templates:

- ``plain``: the findings alone.
- ``site_aware``: the hospital (site), modality, body part and exam description in the
  instruction, which lets one model learn each hospital's reporting style.
- ``site_aware_rag``: ``site_aware`` plus the ``k`` most similar prior cases of the same hospital
  (their findings and impression, see :mod:`common.retrieval`), so the model can follow the
  wording the hospital uses for such findings. The neighbours are shortened to
  ``neighbor_tokens`` each; when the prompt is still too long the query's findings are shortened
  (down to ``MIN_FINDINGS_TOKENS``), then the least similar neighbours dropped.

Instruct models get the tokenizer's chat template. The training target is the impression plus
the end-of-turn token; the loss covers exactly those tokens (prompt and padding are masked with
-100). When an example is too long, the findings are shortened, never the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fedmira.common.errors import ConfigError
from fedmira.common.reports import MODALITY_NAMES, Report
from fedmira.common.retrieval import Neighbor

IGNORE_INDEX = -100
#: System turns: ``full`` names the task; ``short`` saves ~10 tokens per example. Both replace the
#: chat template's generic assistant preamble (SmolLM2 inserts one when no system turn is given).
PREAMBLES = {
    "full": "You are a radiologist. Write the impression section of radiology reports.",
    "short": "Radiology impressions.",
}
SYSTEM_PROMPT = PREAMBLES["full"]
TEMPLATES = ("plain", "site_aware", "site_aware_rag")
RAG_TEMPLATES = ("site_aware_rag",)
#: The query's own findings are shortened no further than this before neighbours are dropped.
MIN_FINDINGS_TOKENS = 48


def _site_header(report: Report) -> str:
    modality = MODALITY_NAMES.get(report.modality, report.modality)
    return f"Hospital: {report.site_id}\nExam: {modality} {report.body_part}; {report.exam}\n"


def _neighbor_block(neighbors: Sequence[Neighbor]) -> str:
    if not neighbors:
        return "Similar prior reports from this hospital: none.\n"
    lines = ["Similar prior reports from this hospital:"]
    for i, n in enumerate(neighbors, 1):
        lines.append(f"[{i}] Findings: {n.findings}\n[{i}] Impression: {n.impression}")
    return "\n".join(lines) + "\n"


def user_message(
    report: Report, template: str, findings: str | None = None, neighbors: Sequence[Neighbor] = (),
) -> str:
    """Build the instruction for one report (``findings`` overrides the report's, for truncation)."""
    text = report.findings if findings is None else findings
    if template == "plain":
        return f"Write the impression for these findings.\nFindings: {text}"
    if template == "site_aware":
        return (f"{_site_header(report)}"
                f"Write the impression for these findings in this hospital's style.\nFindings: {text}")
    if template == "site_aware_rag":
        return (f"{_site_header(report)}{_neighbor_block(neighbors)}"
                f"Write the impression for these findings in this hospital's style.\nFindings: {text}")
    raise ValueError(f"Unknown prompt template {template!r}; use one of {TEMPLATES}.")


def render_prompt(
    report: Report, tokenizer: Any, template: str, findings: str | None = None,
    neighbors: Sequence[Neighbor] = (), preamble: str = "full",
) -> str:
    """Prompt text up to and including the assistant turn's opening."""
    messages = [
        {"role": "system", "content": PREAMBLES[preamble]},
        {"role": "user", "content": user_message(report, template, findings, neighbors)},
    ]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` shortened to about ``max_tokens`` tokens (marked with an ellipsis when cut)."""
    ids = _ids(tokenizer, text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).rstrip() + " ..."


def shorten_neighbors(neighbors: Sequence[Neighbor], tokenizer: Any, max_tokens: int) -> list[Neighbor]:
    """Each neighbour's findings and impression cut to ``max_tokens`` tokens."""
    return [Neighbor(_cut(tokenizer, n.findings, max_tokens), _cut(tokenizer, n.impression, max_tokens),
                     n.score)
            for n in neighbors]


def prompt_ids(
    report: Report, tokenizer: Any, template: str, max_prompt_tokens: int, *,
    neighbors: Sequence[Neighbor] = (), neighbor_tokens: int = 48, preamble: str = "full",
) -> list[int]:
    """Token ids of the prompt, shortened until it fits ``max_prompt_tokens``.

    Without neighbours the findings are shortened. With neighbours (``site_aware_rag``) they are
    first cut to ``neighbor_tokens`` each; then the findings are shortened down to
    ``MIN_FINDINGS_TOKENS``, and while it still does not fit the least similar neighbour is
    dropped, so the report's own findings always come first.
    """
    if template not in RAG_TEMPLATES:
        neighbors = ()
    near = shorten_neighbors(neighbors, tokenizer, neighbor_tokens)
    while True:
        ids = _fit_findings(report, tokenizer, template, max_prompt_tokens, near, preamble,
                            floor=MIN_FINDINGS_TOKENS if near else 0)
        if ids is not None:
            return ids
        if not near:
            raise ConfigError(
                f"The prompt without findings needs more than {max_prompt_tokens} tokens; "
                "raise data.max_length or lower data.max_target_tokens."
            )
        near = near[:-1]


def _fit_findings(
    report: Report, tokenizer: Any, template: str, max_prompt_tokens: int, near: Sequence[Neighbor],
    preamble: str, floor: int,
) -> list[int] | None:
    """Tokenize the prompt with the findings cut (to >= ``floor`` tokens) to fit; None if it can't."""
    ids = _ids(tokenizer, render_prompt(report, tokenizer, template, neighbors=near, preamble=preamble))
    if len(ids) <= max_prompt_tokens:
        return ids
    findings_ids = _ids(tokenizer, report.findings)
    overflow = len(ids) - max_prompt_tokens
    for margin in (0, 4, 16, 64):  # re-tokenizing at the cut can add a token or two
        keep = max(0, len(findings_ids) - overflow - margin)
        if keep < min(floor, len(findings_ids)):
            return None
        cut = tokenizer.decode(findings_ids[:keep]) + " ..."
        ids = _ids(tokenizer, render_prompt(report, tokenizer, template, findings=cut, neighbors=near,
                                            preamble=preamble))
        if len(ids) <= max_prompt_tokens:
            return ids
    return None


def target_ids(report: Report, tokenizer: Any, max_target_tokens: int) -> list[int]:
    """Impression tokens followed by the end-of-turn token, cut to ``max_target_tokens``."""
    ids = _ids(tokenizer, report.impression)[: max_target_tokens - 1]
    return ids + [int(tokenizer.eos_token_id)]


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]


def encode_example(
    report: Report, tokenizer: Any, template: str, max_length: int, max_target_tokens: int, *,
    neighbors: Sequence[Neighbor] = (), neighbor_tokens: int = 48, preamble: str = "full",
) -> Example:
    """Tokenize prompt + target; labels are -100 on the prompt so loss covers the impression."""
    target = target_ids(report, tokenizer, max_target_tokens)
    prompt = prompt_ids(report, tokenizer, template, max_length - len(target), neighbors=neighbors,
                        neighbor_tokens=neighbor_tokens, preamble=preamble)
    return Example(prompt + target, [IGNORE_INDEX] * len(prompt) + target)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padding is masked in both attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def collate_left(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation (new tokens then line up at the right)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}
