"""Tests of prompt rendering, label masking, truncation and batching (common/prompts.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedmira.common.config import DataConfig
from fedmira.common.errors import ConfigError
from fedmira.common.model import LoadedModel
from fedmira.common.prompts import (
    IGNORE_INDEX,
    Example,
    collate,
    collate_left,
    encode_example,
    render_prompt,
    target_ids,
)
from fedmira.common.reports import MODALITY_NAMES, Report


def _encode(report: Report, tiny: LoadedModel, data: DataConfig, template: str | None = None) -> Example:
    """encode_example with the settings of ``data`` (template overridable)."""
    return encode_example(report, tiny.tokenizer, template or data.template, data.max_length,
                          data.max_target_tokens)


def _split(example: Example) -> int:
    """Index of the first supervised position (the prompt is everything before it)."""
    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


@pytest.mark.parametrize("template", ["site_aware", "plain"])
def test_labels_cover_exactly_the_impression_and_the_end_token(
    tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig, template: str
) -> None:
    """Supervised positions decode to impression + eos; every prompt position is -100."""
    tok = tiny.tokenizer
    checked = 0
    for report in reports:
        ex = _encode(report, tiny, data_cfg, template)
        assert len(ex.input_ids) == len(ex.labels) <= data_cfg.max_length
        n = _split(ex)
        assert all(t == IGNORE_INDEX for t in ex.labels[:n])
        assert ex.labels[n:] == ex.input_ids[n:]  # supervised positions are the real tokens
        assert ex.labels[-1] == tok.eos_token_id
        impression_ids = tok(report.impression, add_special_tokens=False)["input_ids"]
        if len(impression_ids) <= data_cfg.max_target_tokens - 1:
            assert tok.decode(ex.labels[n:]) == report.impression + tok.eos_token
            checked += 1
        else:  # a long impression is cut to max_target_tokens, still ending with eos
            assert len(ex.labels) - n == data_cfg.max_target_tokens
            assert report.impression.startswith(tok.decode(ex.labels[n:-1]))
    assert checked >= 30  # most fixture impressions fit: the exact check really ran


def test_prompt_is_the_rendered_chat_prompt_when_nothing_is_cut(
    tiny: LoadedModel, reports: list[Report]
) -> None:
    """With room to spare, the masked part is exactly the chat-template prompt."""
    data = DataConfig(max_length=2048, max_target_tokens=96)
    report = reports[0]
    ex = _encode(report, tiny, data)
    n = _split(ex)
    prompt = render_prompt(report, tiny.tokenizer, data.template)
    assert tiny.tokenizer.decode(ex.input_ids[:n]) == prompt
    assert prompt.endswith("<|im_start|>assistant\n") and report.findings in prompt


def test_long_findings_are_shortened_but_the_target_is_intact(
    tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig
) -> None:
    """Very long findings: total <= max_length, target unchanged, findings marked as cut."""
    tok = tiny.tokenizer
    report = dataclasses.replace(reports[0], findings=" ".join([reports[0].findings] * 20))
    ex = _encode(report, tiny, data_cfg)
    assert len(ex.input_ids) <= data_cfg.max_length
    n = _split(ex)
    assert ex.labels[n:] == target_ids(report, tok, data_cfg.max_target_tokens)
    assert tok.decode(ex.labels[n:]) == report.impression + tok.eos_token
    prompt = tok.decode(ex.input_ids[:n])
    assert "Findings: " + report.findings[:40] in prompt  # the start of the findings is kept
    assert " ...<|im_end|>" in prompt  # ... and the cut is marked
    assert prompt.endswith("<|im_start|>assistant\n")
    assert len(ex.input_ids) >= data_cfg.max_length - 16  # the budget is used, not wasted


def test_long_impression_is_cut_to_max_target_tokens(
    tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig
) -> None:
    """An impression longer than max_target_tokens keeps its first tokens and the end token."""
    report = dataclasses.replace(reports[0], impression=" ".join([reports[0].impression] * 10))
    target = target_ids(report, tiny.tokenizer, data_cfg.max_target_tokens)
    assert len(target) == data_cfg.max_target_tokens and target[-1] == tiny.tokenizer.eos_token_id
    ex = _encode(report, tiny, data_cfg)
    assert ex.labels[_split(ex):] == target and len(ex.input_ids) <= data_cfg.max_length


def test_prompt_that_cannot_fit_raises_config_error(tiny: LoadedModel, reports: list[Report]) -> None:
    """When even the prompt without findings is too long, the error says which knob to turn."""
    with pytest.raises(ConfigError, match="data.max_length"):
        encode_example(reports[0], tiny.tokenizer, "site_aware", max_length=40, max_target_tokens=8)


def test_site_aware_prompt_names_site_modality_and_exam_plain_does_not(
    tiny: LoadedModel, reports: list[Report]
) -> None:
    """site_aware carries hospital, modality name and exam; plain carries the findings only."""
    for report in {r.modality: r for r in reports}.values():  # one report per modality
        aware = render_prompt(report, tiny.tokenizer, "site_aware")
        plain = render_prompt(report, tiny.tokenizer, "plain")
        modality = MODALITY_NAMES[report.modality]
        assert report.site_id in aware and report.exam in aware
        assert f"Exam: {modality} {report.body_part}; {report.exam}" in aware
        assert report.site_id not in plain and "Hospital:" not in plain and "Exam:" not in plain
        assert report.findings in aware and report.findings in plain


def test_unknown_template_is_rejected(tiny: LoadedModel, reports: list[Report]) -> None:
    """A template name that is not one of TEMPLATES fails loudly."""
    with pytest.raises(ValueError, match="template"):
        render_prompt(reports[0], tiny.tokenizer, "fancy")


def test_collate_pads_right_with_masked_labels_and_attention() -> None:
    """Right padding: pad id in inputs, -100 in labels, 0 in the attention mask."""
    pad = 0
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_pads_left() -> None:
    """Left padding for generation: prompts end at the right edge."""
    batch = collate_left([[5, 6, 7], [8]], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert set(batch) == {"input_ids", "attention_mask"}


def test_collate_of_encoded_reports_matches_their_lengths(
    tiny: LoadedModel, reports: list[Report]
) -> None:
    """Real examples: each row's attention sum is its length; padded labels are all -100."""
    data = DataConfig(max_length=1024, max_target_tokens=96)  # no cut: lengths differ
    examples = [_encode(r, tiny, data) for r in reports[:6]]
    assert len({len(e.input_ids) for e in examples}) > 1
    batch = collate(examples, int(tiny.tokenizer.pad_token_id))
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert int(batch["attention_mask"][i].sum()) == n
        assert batch["labels"][i, :n].tolist() == ex.labels
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
