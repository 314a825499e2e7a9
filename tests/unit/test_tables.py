"""common.tables: the one Markdown table writer (tabulate's github format) of every result file."""

from __future__ import annotations

import pytest

from fedmira.common.tables import markdown_table


def test_a_table_is_githubs_format_with_cells_kept_as_written() -> None:
    table = markdown_table(["site", "ROUGE-L"], [["site_01", "0.500"], ["site_02", 0.25]])
    assert table.splitlines() == [
        "| site    | ROUGE-L   |",
        "|---------|-----------|",
        "| site_01 | 0.500     |",  # not reparsed as a number (tabulate would print 0.5)
        "| site_02 | 0.25      |",
    ]


def test_a_pipe_or_a_line_break_in_a_cell_cannot_break_the_table() -> None:
    table = markdown_table(["what", "note"], [["a|b", "line one\nline two"]])
    header, rule, row = table.splitlines()
    assert row == "| a\\|b   | line one line two |"
    assert header.count(" | ") == row.count(" | ") == 1  # two columns, as in the header


def test_a_row_of_the_wrong_length_is_refused_by_its_index() -> None:
    with pytest.raises(ValueError, match="table row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
