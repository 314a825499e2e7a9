"""Markdown tables for fedmira's written results (evaluation, comparison, model card)."""

from __future__ import annotations

from typing import Iterable, Sequence

from tabulate import tabulate


def markdown_table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Render a GitHub-flavoured Markdown table (``tabulate``'s ``github`` format).

    Each cell is written as ``str(cell)``: numbers are not reformatted or realigned, so format
    them first. ``|`` in a cell is escaped and line breaks become spaces, so no cell can break
    the table's layout.

    Parameters
    ----------
    headers : sequence
        The column titles.
    rows : iterable of sequences
        One sequence of cells per row, each as long as ``headers``.

    Returns
    -------
    str
        The header line, the separator line and one line per row, without a final newline.

    Raises
    ------
    ValueError
        When a row has more or fewer cells than there are headers.
    """
    body = [[_cell(c) for c in row] for row in rows]
    for i, row in enumerate(body):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(headers)} columns")
    return tabulate(body, headers=[_cell(h) for h in headers], tablefmt="github", disable_numparse=True)


def _cell(value: object) -> str:
    """One cell's text: ``|`` escaped, line breaks as spaces."""
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return text.replace("|", "\\|")
