"""What every benchmark returns: rows of one measurement next to its side-by-side baseline.

A benchmark module (``simulations/bench/<name>.py``) exposes::

    def run(quick: bool) -> list[BenchRow]: ...

and is listed in ``simulations.bench.run.BENCHMARKS``. ``quick`` asks for fewer repeats or
smaller sizes (a smoke run); the module decides what that means and says so in its rows'
notes. Each row holds one measured ``value`` and, where there is one, the ``baseline``
measured in the same run on the same machine, and ``ratio = value / baseline``: ratios hold
on a noisy shared machine where absolute times do not. ``target`` is an optional bound on the
ratio (``">= 0.95"``, ``"<= 1.5"``) that the runner checks and reports; benchmarks never
assert. Notes hold numbers and settings only (never report text).
"""

from __future__ import annotations

import math
import operator
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}


@dataclass(frozen=True)
class BenchRow:
    """One measurement of a benchmark.

    Attributes
    ----------
    name:
        What was measured, e.g. ``"ClientApp train / bare PEFT loop"``.
    value:
        The measured (or computed) value, in ``unit``.
    unit:
        ``"tok/s"``, ``"s"``, ``"ms"``, ``"MB"``...
    baseline:
        The reference measured side by side with ``value`` (same unit), or None.
    ratio:
        ``value / baseline`` unless the benchmark computed a better estimate (e.g. the median
        of interleaved pairs' ratios); None when there is no baseline.
    target:
        A bound on ``ratio`` such as ``">= 0.95"``; empty when the row has no target.
    note:
        What the baseline is and the settings that matter for reading the number.
    """

    name: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.target:
            parse_target(self.target)  # fail at construction, not when the table is printed
        if self.ratio is None and self.baseline is not None:
            object.__setattr__(self, "ratio", ratio(self.value, self.baseline))

    @property
    def met(self) -> bool | None:
        """Whether ``ratio`` meets ``target``; None when there is no target or no ratio."""
        if not self.target or self.ratio is None or math.isnan(self.ratio):
            return None
        op, bound = parse_target(self.target)
        return _OPS[op](self.ratio, bound)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None, since JSON has no NaN)."""
        d = asdict(self)
        d["met"] = self.met
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def parse_target(target: str) -> tuple[str, float]:
    """``">= 0.95"`` -> ``(">=", 0.95)``.

    Raises
    ------
    ValueError
        When the target is not an operator among ``>= <= > <`` followed by a number.
    """
    text = target.strip()
    for op in (">=", "<=", ">", "<"):  # two-character operators first
        if text.startswith(op):
            try:
                return op, float(text[len(op):])
            except ValueError:
                break
    raise ValueError(f"target {target!r} must look like '>= 0.95' or '<= 1.5'")


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``; NaN when the baseline is zero (no meaningful ratio)."""
    return value / baseline if baseline else math.nan


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    """Median over ``(value, baseline)`` pairs of ``value / baseline``.

    Pairs measured back to back (A B A B ...) share the machine's load at that moment, so the
    median of their ratios cancels slow drift (another job starting) better than the ratio of
    two medians.
    """
    if not pairs:
        raise ValueError("median_ratio needs at least one pair")
    return statistics.median(ratio(v, b) for v, b in pairs)


def interleaved_pairs(a: Callable[[], float], b: Callable[[], float], n: int) -> list[tuple[float, float]]:
    """Return ``n`` (a, b) measurements after one warm-up call of each.

    Which side runs first alternates (A B, B A, ...) so slow drift of the machine's load hits both
    sides alike.
    """
    a(), b()  # warm-up: first-call allocations and kernels
    out = []
    for i in range(n):
        if i % 2 == 0:
            x, y = a(), b()
        else:
            y, x = b(), a()
        out.append((x, y))
    return out
