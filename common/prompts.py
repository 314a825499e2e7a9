"""Prompts as in the study: findings -> impression, optionally site- and exam-aware.

Two templates:

- ``plain``: the findings alone.
- ``site_aware``: the hospital (site), modality, body part and exam description in the
  instruction, which lets one model learn each hospital's reporting style.

Instruct models get the tokenizer's chat template. The training target is the impression plus
the end-of-turn token; the loss covers exactly those tokens (prompt and padding are masked with
-100). When an example is too long, the findings are shortened, never the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from common.errors import ConfigError
from common.reports import MODALITY_NAMES, Report

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a radiologist. Write the impression section of radiology reports."
TEMPLATES = ("plain", "site_aware")


def user_message(report: Report, template: str, findings: str | None = None) -> str:
    """The instruction for one report (``findings`` overrides the report's, for truncation)."""
    text = report.findings if findings is None else findings
    if template == "plain":
        return f"Write the impression for these findings.\nFindings: {text}"
    if template == "site_aware":
        modality = MODALITY_NAMES.get(report.modality, report.modality)
        return (
            f"Hospital: {report.site_id}\nExam: {modality} {report.body_part}; {report.exam}\n"
            f"Write the impression for these findings in this hospital's style.\nFindings: {text}"
        )
    raise ValueError(f"Unknown prompt template {template!r}; use one of {TEMPLATES}.")


def render_prompt(report: Report, tokenizer: Any, template: str, findings: str | None = None) -> str:
    """Prompt text up to and including the assistant turn's opening."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message(report, template, findings)},
    ]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(report: Report, tokenizer: Any, template: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of the prompt, with the findings shortened until it fits ``max_prompt_tokens``."""
    ids = _ids(tokenizer, render_prompt(report, tokenizer, template))
    if len(ids) <= max_prompt_tokens:
        return ids
    findings_ids = _ids(tokenizer, report.findings)
    overflow = len(ids) - max_prompt_tokens
    for margin in (0, 4, 16, 64):  # re-tokenizing at the cut can add a token or two
        keep = max(0, len(findings_ids) - overflow - margin)
        cut = tokenizer.decode(findings_ids[:keep]) + " ..."
        ids = _ids(tokenizer, render_prompt(report, tokenizer, template, findings=cut))
        if len(ids) <= max_prompt_tokens:
            return ids
    raise ConfigError(
        f"The prompt without findings needs more than {max_prompt_tokens} tokens; "
        "raise data.max_length or lower data.max_target_tokens."
    )


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
    report: Report, tokenizer: Any, template: str, max_length: int, max_target_tokens: int
) -> Example:
    """Tokenize prompt + target; labels are -100 on the prompt so loss covers the impression."""
    target = target_ids(report, tokenizer, max_target_tokens)
    prompt = prompt_ids(report, tokenizer, template, max_length - len(target))
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
