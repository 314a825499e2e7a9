"""Report readers, row validation, profile and ``data check``.

Fixtures under ``tests/assets/`` are synthetic and PHI-free. Damaged files are written to
``tmp_path`` as altered copies, and every test that produces problems also checks that no
report text leaks into a problem message.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Callable

import pytest

from fedmira.common.errors import ConfigError, DataError
from fedmira.common.reports import (
    MODALITIES,
    LoadResult,
    Problem,
    Report,
    check_data,
    format_profile,
    load_reports,
    normalize_modality,
    profile,
    read_jsonl,
    write_jsonl,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
JSONL = ASSETS / "tiny_reports.jsonl"
CSV = ASSETS / "tiny_reports.csv"
IU = ASSETS / "tiny_iu.csv"


def _trigrams(text: str) -> set[str]:
    words = re.findall(r"[a-z0-9-]+", text.lower())
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}


def _asset_text_trigrams() -> set[str]:
    """Every three-word run of report text in the fixtures."""
    grams: set[str] = set()
    for line in JSONL.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        for key in ("findings", "impression", "exam"):
            grams |= _trigrams(obj[key])
    for path in (CSV, IU):
        grams |= _trigrams(path.read_text(encoding="utf-8").split("\n", 1)[1])
    return grams


TEXT_TRIGRAMS = _asset_text_trigrams()


def assert_no_report_text(problems: list[Problem]) -> None:
    """No problem message may quote findings, impression or exam text."""
    for problem in problems:
        leaked = _trigrams(str(problem)) & TEXT_TRIGRAMS
        assert not leaked, f"report text in problem message: {leaked} <- {problem}"


def _jsonl_lines() -> list[dict]:
    return [json.loads(line) for line in JSONL.read_text(encoding="utf-8").splitlines()]


def _write_jsonl_objects(path: Path, objs: list[object]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Clean fixtures
# --------------------------------------------------------------------------------------------


def test_jsonl_fixture_loads_cleanly() -> None:
    result = load_reports(JSONL)
    assert (result.format, result.rows_total, result.rows_skipped) == ("jsonl", 24, 0)
    assert result.problems == []
    assert {r.site_id for r in result.reports} == {"site-a", "site-b", "site-c"}
    assert {r.modality for r in result.reports} == {"CT", "MR", "DR"}
    first = result.reports[0]
    assert first == Report(
        report_id="r-001", site_id="site-a", modality="CT", body_part="chest",
        exam="CT chest with contrast",
        findings="No pulmonary embolism. Lungs are clear. No pleural effusion.",
        impression="No acute intrathoracic abnormality.",
        patient_id="p-001", age=30, sex="M", study_date="2021-01-10", labels=(),
    )
    assert result.reports[2].labels == ("cardiomegaly", "atelectasis")


def test_canonical_csv_fixture_loads_with_synonyms_and_multiline_fields() -> None:
    result = load_reports(CSV)
    assert (result.format, result.rows_total, len(result.reports)) == ("csv", 12, 12)
    assert result.problems == []
    by_id = {r.report_id: r for r in result.reports}
    assert [by_id[i].modality for i in ("c-001", "c-002", "c-003")] == ["CT", "MR", "DR"]
    assert by_id["c-003"].findings == "No focal consolidation.\nHeart size normal.\nNo pneumothorax."
    assert by_id["c-001"].labels == ("effusion", "nodule")
    assert by_id["c-001"].age == 40 and by_id["c-005"].age is None


def test_iu_fixture_maps_layout_and_skips_rows_without_sections() -> None:
    result = load_reports(IU)
    assert (result.format, result.rows_total, len(result.reports)) == ("iu", 8, 6)
    assert [(p.line, p.report_id, p.field, p.code) for p in result.problems] == [
        (4, "iu-3", "findings", "empty_field"),
        (8, "iu-6", "impression", "empty_field"),
    ]
    by_id = {r.report_id: r for r in result.reports}
    assert set(by_id) == {"iu-1", "iu-2", "iu-4", "iu-5", "iu-7", "iu-8"}
    two = by_id["iu-2"]
    assert (two.site_id, two.modality, two.body_part, two.exam) == ("iu", "DR", "chest", "Chest, 2 views")
    assert two.labels == ("Cardiomegaly",)  # de-duplicated, empty item dropped
    assert by_id["iu-8"].labels == ()
    assert by_id["iu-8"].findings == "No acute osseous abnormality. Lungs are clear."
    assert_no_report_text(result.problems)


def test_iu_site_id_argument() -> None:
    result = load_reports(IU, site_id="hospital-7")
    assert {r.site_id for r in result.reports} == {"hospital-7"}


# --------------------------------------------------------------------------------------------
# Damaged JSONL: each damage gives exactly one problem on the right line
# --------------------------------------------------------------------------------------------


def _set(index: int, **changes: object) -> Callable[[list[dict]], list[object]]:
    def apply(objs: list[dict]) -> list[object]:
        objs[index] = {**objs[index], **changes}
        return objs
    return apply


def _drop(index: int, key: str) -> Callable[[list[dict]], list[object]]:
    def apply(objs: list[dict]) -> list[object]:
        del objs[index][key]
        return objs
    return apply


def _replace(index: int, value: object) -> Callable[[list[dict]], list[object]]:
    def apply(objs: list[dict]) -> list[object]:
        objs[index] = value  # type: ignore[call-overload]
        return objs
    return apply


JSONL_DAMAGE = {
    "empty_impression": (_set(2, impression="   "), 3, "impression", "empty_field"),
    "missing_findings": (_drop(12, "findings"), 13, "findings", "missing_field"),
    "duplicate_id": (_set(9, report_id="r-002"), 10, "report_id", "duplicate_id"),
    "unknown_modality": (_set(11, modality="SPECTROSCOPY-XYZ-12345"), 12, "modality", "unknown_modality"),
    "bad_age": (_set(13, age="forty"), 14, "age", "bad_value"),
    "negative_age": (_set(13, age=-3), 14, "age", "bad_value"),
    "bad_labels": (_set(17, labels=5), 18, "labels", "bad_value"),
    "findings_not_text": (_set(4, findings=["a", "b"]), 5, "findings", "bad_value"),
    "empty_site": (_set(16, site_id=""), 17, "site_id", "empty_field"),
    "not_an_object": (_replace(15, [1, 2, 3]), 16, None, "malformed_line"),
    "surrogate_escape": (_set(6, impression="No acute \ud800 process."), 7, "impression", "bad_utf8"),
}


@pytest.mark.parametrize("case", sorted(JSONL_DAMAGE))
def test_damaged_jsonl_row_gives_exactly_its_problem(case: str, tmp_path: Path) -> None:
    damage, line, fld, code = JSONL_DAMAGE[case]
    path = _write_jsonl_objects(tmp_path / "reports.jsonl", damage(_jsonl_lines()))
    result = load_reports(path)
    assert [(p.line, p.field, p.code) for p in result.problems] == [(line, fld, code)]
    assert (result.rows_total, len(result.reports), result.rows_skipped) == (24, 23, 1)
    assert_no_report_text(result.problems)


def test_unknown_modality_value_is_clipped(tmp_path: Path) -> None:
    objs = _set(0, modality="X" * 40)(_jsonl_lines())
    result = load_reports(_write_jsonl_objects(tmp_path / "r.jsonl", objs))
    message = result.problems[0].message
    assert "X" * 16 not in message and "X" * 15 in message


def test_too_long_text(tmp_path: Path) -> None:
    objs = _set(14, findings="No pleural effusion seen. " * 10)(_jsonl_lines())
    result = load_reports(_write_jsonl_objects(tmp_path / "r.jsonl", objs), max_chars=100)
    assert [(p.line, p.field, p.code) for p in result.problems] == [(15, "findings", "too_long")]
    assert "259 characters" in result.problems[0].message
    assert_no_report_text(result.problems)


def _raw_lines() -> list[bytes]:
    return JSONL.read_bytes().splitlines(keepends=True)


def test_jsonl_bad_utf8_byte(tmp_path: Path) -> None:
    lines = _raw_lines()
    lines[4] = lines[4].replace(b"site-a", b"site-\xff")
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(lines))
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(5, "bad_utf8")]
    assert len(result.reports) == 23
    assert_no_report_text(result.problems)


def test_jsonl_malformed_and_cut_off_lines(tmp_path: Path) -> None:
    lines = _raw_lines()
    lines[6] = lines[6].replace(b"}", b"", 1)[:-1] + b"\n"  # closing brace gone
    lines[23] = lines[23][:70]  # file cut off in the middle of the last object
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(lines))
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(7, "malformed_line"), (24, "malformed_line")]
    assert (result.rows_total, len(result.reports)) == (24, 22)
    assert_no_report_text(result.problems)


def test_jsonl_blank_lines_crlf_and_bom_keep_line_numbers(tmp_path: Path) -> None:
    lines = [b"\n"] + _raw_lines()
    lines[3] = b'{"report_id": "x"}\n'  # r-003, now on physical line 4, loses its other fields
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(lines).replace(b"\n", b"\r\n"))
    result = load_reports(path)
    assert {p.line for p in result.problems} == {4}
    assert result.rows_total == 24 and len(result.reports) == 23


# --------------------------------------------------------------------------------------------
# Damaged CSV: physical line numbers survive quoted multi-line fields
# --------------------------------------------------------------------------------------------

# tiny_reports.csv: header on line 1, c-001 on line 2, c-003 spans lines 4-6, c-004 on line 7,
# c-00N (N >= 4) on line N + 3, c-012 on line 15.


def _csv_copy(tmp_path: Path, edit: Callable[[bytes], bytes]) -> Path:
    path = tmp_path / "reports.csv"
    path.write_bytes(edit(CSV.read_bytes()))
    return path


def test_csv_bad_utf8_byte_names_row_and_field(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b.replace(b"Small right pleural", b"Small r\xe9ght pleural"))
    result = load_reports(path)
    assert [(p.line, p.report_id, p.field, p.code) for p in result.problems] == [
        (7, "c-004", "findings", "bad_utf8")
    ]
    assert len(result.reports) == 11
    assert_no_report_text(result.problems)


def test_csv_empty_impression_after_multiline_row(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b.replace(b",Left basilar atelectasis.,", b",,"))
    result = load_reports(path)
    assert [(p.line, p.report_id, p.field, p.code) for p in result.problems] == [
        (12, "c-009", "impression", "empty_field")
    ]
    assert_no_report_text(result.problems)


def test_csv_wrong_column_count(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b.replace(b"2022-03-17,infarct", b"2022-03-17,infarct,extra"))
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(11, "malformed_line")]
    assert "13 columns but the header has 12" in result.problems[0].message


def test_csv_cut_off_unquoted_last_row(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b[: b.index(b"c-012") + len(b"c-012,site-c,DR,chest")])
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(15, "malformed_line")]
    assert (result.rows_total, len(result.reports)) == (12, 11)


def test_csv_cut_off_inside_quoted_last_field(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b[: b.index(b'"Hyperinflation, no acute') + 10])
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(15, "malformed_line")]
    assert "never closed" in result.problems[0].message
    assert_no_report_text(result.problems)


def test_csv_cut_off_inside_multiline_field(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b[: b.index(b"No pneumothorax.\"")])
    result = load_reports(path)
    assert [(p.line, p.code) for p in result.problems] == [(4, "malformed_line")]
    assert (result.rows_total, len(result.reports)) == (3, 2)


def test_csv_crlf_and_bom(tmp_path: Path) -> None:
    def crlf_bom(data: bytes) -> bytes:
        return b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n").replace(b"c-009,site-c", b"c-009,")

    path = _csv_copy(tmp_path, crlf_bom)
    result = load_reports(path)
    assert [(p.line, p.field, p.code) for p in result.problems] == [(12, "site_id", "empty_field")]
    assert result.reports[2].findings == "No focal consolidation.\r\nHeart size normal.\r\nNo pneumothorax."


def test_empty_site_id_filled_from_argument(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b.replace(b"c-009,site-c", b"c-009,"))
    result = load_reports(path, site_id="site-z")
    assert result.problems == [] and result.reports[8].site_id == "site-z"


def test_iu_bad_utf8_in_unused_column_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "iu.csv"
    data = IU.read_bytes().replace(b"Cough.", b"Cou\xffgh.")  # indication: not used
    path.write_bytes(data.replace(b"Mild cardiomegaly. Lungs", b"Mild \xe9 Lungs"))
    result = load_reports(path)
    assert [(p.line, p.report_id, p.field, p.code) for p in result.problems if p.code == "bad_utf8"] == [
        (3, "iu-2", "findings", "bad_utf8")
    ]
    assert len(result.reports) == 5


# --------------------------------------------------------------------------------------------
# Formats, files and policy
# --------------------------------------------------------------------------------------------


def test_auto_format_by_extension_and_header(tmp_path: Path) -> None:
    ndjson = tmp_path / "r.ndjson"
    ndjson.write_bytes(JSONL.read_bytes())
    assert load_reports(ndjson).format == "jsonl"
    assert load_reports(CSV).format == "csv"
    assert load_reports(IU).format == "iu"
    assert load_reports(CSV, fmt="csv").format == "csv"


def test_unknown_csv_header_names_file_and_expected_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"other\.csv.*report_id.*uid"):
        load_reports(path)
    with pytest.raises(DataError, match="uid"):
        load_reports(CSV, fmt="iu")


def test_headerless_csv_error_does_not_echo_report_text(tmp_path: Path) -> None:
    path = tmp_path / "noheader.csv"
    path.write_bytes(CSV.read_bytes().split(b"\n", 1)[1])
    with pytest.raises(DataError, match=r"is the header missing\?") as info:
        load_reports(path)
    assert not _trigrams(str(info.value)) & TEXT_TRIGRAMS


def test_unknown_extension_and_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "reports.txt"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(DataError, match="data.format"):
        load_reports(path)
    with pytest.raises(ConfigError):
        load_reports(JSONL, fmt="xml")
    with pytest.raises(ConfigError):
        load_reports(JSONL, policy="ignore")


def test_missing_file_directory_and_empty_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Report file not found: .*nope\.jsonl\. Check data\.path"):
        load_reports(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="directory"):
        load_reports(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="no CSV header"):
        load_reports(empty)


def test_policy_fail_raises_at_first_problem(tmp_path: Path) -> None:
    path = _csv_copy(tmp_path, lambda b: b.replace(b"Small right pleural", b"Small r\xe9ght pleural"))
    with pytest.raises(DataError, match=r"reports\.csv:7 \(report c-004\).*UTF-8"):
        load_reports(path, policy="fail")
    assert len(load_reports(CSV, policy="fail").reports) == 12


def test_problem_str() -> None:
    problem = Problem("reports.csv", 17, "r-12", "impression", "empty_field",
                      "field 'impression' is empty; fill it in or drop the row.")
    assert str(problem) == (
        "reports.csv:17 (report r-12): field 'impression' is empty; fill it in or drop the row."
    )
    assert str(Problem("r.jsonl", None, None, None, "malformed_line", "x.")) == "r.jsonl: x."


@pytest.mark.parametrize(
    ("value", "code"),
    [("ct", "CT"), ("MRI", "MR"), ("mr", "MR"), ("XR", "DR"), ("X-ray", "DR"), ("x ray", "DR"),
     ("Radiograph", "DR"), ("CXR", "DR"), ("cr", "CR"), ("PET", "PT"), ("SPECT", None), ("", None)],
)
def test_normalize_modality(value: str, code: str | None) -> None:
    assert normalize_modality(value) == code
    assert code is None or code in MODALITIES


def test_write_and_read_jsonl_round_trip(tmp_path: Path) -> None:
    reports = load_reports(CSV).reports + [
        Report("u-1", "site-ü", "US", "abdomen", "", "Liver normal –\u2028no mass.", "Normal ultrasound.",
               labels=("a", "b"))
    ]
    path = tmp_path / "out" / "reports.jsonl"
    write_jsonl(reports, path)
    assert list(json.loads(path.read_text(encoding="utf-8").split("\n")[0])) == [
        "report_id", "site_id", "modality", "body_part", "exam", "findings", "impression",
        "patient_id", "age", "sex", "study_date", "labels",
    ]
    back = read_jsonl(path)
    assert back.problems == [] and back.reports == reports
    assert not (tmp_path / "out" / "reports.jsonl.tmp").exists()


# --------------------------------------------------------------------------------------------
# Profile and check_data
# --------------------------------------------------------------------------------------------


def test_profile_counts_and_lengths() -> None:
    reports = [
        Report(f"r{i}", "a" if i < 3 else "b", "CT", "chest", "", " ".join(["w"] * n), "x y")
        for i, n in enumerate([1, 2, 3, 4, 10])
    ]
    problems = [
        Problem("f", 1, None, None, "malformed_line", "m"),
        Problem("f", 2, "r", "impression", "empty_field", "m"),
    ]
    prof = profile(LoadResult(reports, problems, 7, "f.jsonl", "jsonl"), count_tokens=len)
    assert (prof["rows_total"], prof["rows_kept"], prof["rows_skipped"]) == (7, 5, 2)
    assert prof["problems"] == {"empty_field": 1, "malformed_line": 1}
    assert prof["sites"] == {"a": 3, "b": 2}
    assert prof["modalities"] == {"CT": 5} and prof["body_parts"] == {"chest": 5}
    assert prof["lengths"]["findings"]["words"] == {"min": 1, "p50": 3, "p90": 10, "max": 10, "mean": 4.0}
    assert prof["lengths"]["impression"]["tokens"]["max"] == 3
    text = format_profile(prof)
    assert "7 total, 5 kept, 2 skipped" in text and "findings tokens" in text


def test_profile_of_nothing() -> None:
    prof = profile(LoadResult([], [], 0, "f.jsonl", "jsonl"))
    assert prof["lengths"]["findings"]["words"]["p50"] is None
    assert "Sites: none" in format_profile(prof)


def test_check_data_ok() -> None:
    out = io.StringIO()
    assert check_data(IU, out=out) == 0
    text = out.getvalue()
    assert "tiny_iu.csv:4 (report iu-3): field 'findings' is empty" in text
    assert "8 total, 6 kept, 2 skipped" in text


def test_check_data_caps_problem_lines(tmp_path: Path) -> None:
    objs = _jsonl_lines()
    for obj in objs[:5]:
        obj["impression"] = ""
    path = _write_jsonl_objects(tmp_path / "r.jsonl", objs)
    out = io.StringIO()
    assert check_data(path, max_problems_shown=2, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[2] == "... and 3 more problems (codes: empty_field 3)"
    assert not lines[3].startswith(str(path))


def test_check_data_nothing_usable(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"{not json\n\xff\n")
    out = io.StringIO()
    assert check_data(path, out=out) == 1
    assert "No usable reports" in out.getvalue()


def test_check_data_errors_return_2_without_traceback(tmp_path: Path) -> None:
    out = io.StringIO()
    assert check_data(tmp_path / "missing.jsonl", out=out) == 2
    assert "Report file not found" in out.getvalue() and "Traceback" not in out.getvalue()
    bad = _csv_copy(tmp_path, lambda b: b.replace(b",Left basilar atelectasis.,", b",,"))
    out = io.StringIO()
    assert check_data(bad, policy="fail", out=out) == 2
    assert "reports.csv:12 (report c-009): field 'impression' is empty" in out.getvalue()


def test_csv_quote_left_open_mid_file_is_one_problem(tmp_path: Path) -> None:
    def open_quote(data: bytes) -> bytes:
        head, tail = data.split(b"c-005,", 1)
        # No other quote after this one: it runs to the end of the file.
        return head + b'c-005,site-b,MR,brain,"MRI' + tail.split(b"MRI", 1)[1].replace(b'"', b"'")

    result = load_reports(_csv_copy(tmp_path, open_quote))
    assert [(p.line, p.code) for p in result.problems] == [(8, "malformed_line")]
    assert "lines 8-15" in result.problems[0].message and "never closed" in result.problems[0].message
    assert (result.rows_total, len(result.reports)) == (5, 4)
    assert_no_report_text(result.problems)


# --------------------------------------------------------------------------------------------
# Bare RIS exports and hostile lines (issue 14)
# --------------------------------------------------------------------------------------------


def test_a_bare_export_checks_with_defaults(tmp_path: Path) -> None:
    """Only an id, findings and impression: the site is the file's (or the hospital's), the
    exam context "unknown"; a field the export has but leaves blank is still reported."""
    path = tmp_path / "st_marys.jsonl"
    rows = [{"report_id": "a1", "findings": "Lungs clear.", "impression": "Normal."},
            {"id": 7, "findings": "Small effusion.", "impression": "Effusion."},
            {"accession": "ACC-9", "findings": "No change.", "impression": "Stable."},
            {"report_id": "a4", "findings": "Clear.", "impression": "Normal.", "modality": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = load_reports(path)
    assert [r.report_id for r in result.reports] == ["a1", "7", "ACC-9"]
    first = result.reports[0]
    assert (first.site_id, first.modality, first.body_part, first.exam) == \
        ("st_marys", "UN", "unknown", "unknown")
    assert [(p.line, p.field, p.code) for p in result.problems] == [(4, "modality", "missing_field")]
    assert {r.site_id for r in load_reports(path, site_id="hospital_07").reports} == {"hospital_07"}


def test_a_bare_csv_export_loads(tmp_path: Path) -> None:
    path = tmp_path / "ris.csv"
    path.write_text("accession,findings,impression\nA1,Lungs clear.,Normal.\n", encoding="utf-8")
    (report,) = load_reports(path).reports
    assert (report.report_id, report.site_id, report.modality) == ("A1", "ris", "UN")


def test_unknown_modality_reads_in_the_site_aware_prompt() -> None:
    from fedmira.common.reports import MODALITY_NAMES, normalize_modality

    assert normalize_modality("unknown") == "UN" and MODALITY_NAMES["UN"] == "unknown modality"


@pytest.mark.parametrize(("line", "code"), [
    (b"[" * 100_000, "too_deep"),                                  # RecursionError in json before
    (b'{"report_id": "x", "labels": ' + b"[" * 200 + b"]" * 200 + b"}", "too_deep"),
    (b'{"findings": "' + b"a" * 2_000_000 + b'"}', "line_too_long"),
])
def test_hostile_lines_are_refused_before_parsing(tmp_path: Path, line: bytes, code: str) -> None:
    path = tmp_path / "r.jsonl"
    good = b'{"report_id": "ok", "site_id": "s", "modality": "CT", "body_part": "", "exam": "", ' \
           b'"findings": "Clear.", "impression": "Normal."}\n'
    path.write_bytes(good + line + b"\n")
    result = load_reports(path, max_chars=20_000)
    assert [(p.line, p.code) for p in result.problems] == [(2, code)]
    assert [r.report_id for r in result.reports] == ["ok"]
    assert len(result.problems[0].message) < 300


def test_brackets_inside_strings_are_not_nesting(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    row = {"report_id": "b", "site_id": "s", "modality": "CT", "body_part": "", "exam": "",
           "findings": "[" * 500 + " \\\" {" * 100, "impression": "Normal."}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert [r.report_id for r in load_reports(path).reports] == ["b"]
