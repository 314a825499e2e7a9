"""A reader study's statistics, from its answers: the study's tables, as pure functions.

``fedmira reader-study analyze`` loads the database (``common.reader_store.load_all``) and calls
:func:`analyze`; :func:`write_report` writes Markdown, CSV, JSON and plots. No report text is in
any output but the readers' own drafts' lengths; texts are only compared in memory.

* **Pairwise.** Per arm (system X vs Y, e.g. ``fedavg`` vs ``reference``): X better / equal /
  worse, and the share rated at least as good with a Wilson 95% interval
  (:meth:`scipy.stats.binomtest` ``proportion_ci``). Arms against each other: chi-square tests
  of their at-least-as-good counts (:func:`scipy.stats.chi2_contingency`), Holm-Bonferroni across
  all pairs (``common.stats.holm_bonferroni``). Acceptability (1-5) per system with a bootstrap
  CI; error-flag rates per system; the shares per site and per modality.
* **Drafting.** Active seconds per report from scratch and with the draft; the time saved per
  report paired by reader (each reader's mean scratch minus mean assisted time), with a t
  interval (:func:`scipy.stats.ttest_1samp`) and a Wilcoxon p-value.
* **Agreement.** Krippendorff's alpha (the ``krippendorff`` package) of the pairwise preference
  (ordinal: worse < equal < better) and of the acceptability ratings, over items read by two or
  more readers; for drafts, the mean pairwise ROUGE-L between readers' impressions of one case,
  from scratch vs with the draft (do drafts make radiologists write alike?).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedmira.common.reader_design import ASSISTED, DRAFT, ERROR_FLAGS, PAIRWISE, SCRATCH, StudySettings

OUTCOMES = ("better", "equal", "worse")
_ORDINAL = {"worse": 0, "equal": 1, "better": 2}


def judgments(data: Mapping[str, list[dict[str, Any]]], settings: StudySettings) -> list[dict[str, Any]]:
    """One row per answered pairwise task, oriented to its arm as listed in the settings.

    ``outcome`` is the arm's first system against its second; ``accept_first``/``flags_first``
    are the first system's rating and flags whatever side it was shown on.
    """
    tasks = {t["task_id"]: t for t in data["tasks"]}
    cases = {c["case_id"]: c for c in data["cases"]}
    arms = {frozenset(a): a for a in settings.arms}
    rows = []
    for ans in data["answers"]:
        t = tasks[ans["task_id"]]
        if t["kind"] != PAIRWISE:
            continue
        first, second = arms[frozenset((t["left_system"], t["right_system"]))]
        flipped = t["left_system"] != first  # the first system was shown as B
        side = {"A": "B", "B": "A", "equal": "equal"}[ans["preference"]] if flipped else ans["preference"]
        outcome = {"A": "better", "equal": "equal", "B": "worse"}[side]
        a_key, b_key = ("b", "a") if flipped else ("a", "b")
        case = cases[t["case_id"]]
        rows.append(
            {
                "task_id": t["task_id"],
                "case_id": t["case_id"],
                "reader_id": t["reader_id"],
                "site_id": case["site_id"],
                "modality": case["modality"],
                "arm": f"{first} vs {second}",
                "first": first,
                "second": second,
                "outcome": outcome,
                "accept_first": ans[f"accept_{a_key}"],
                "accept_second": ans[f"accept_{b_key}"],
                "flags_first": ans[f"flags_{a_key}"],
                "flags_second": ans[f"flags_{b_key}"],
            }
        )
    return rows


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a share k/n (scipy's)."""
    from scipy.stats import binomtest

    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def arm_shares(rows: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per arm: counts of each outcome and the share at least as good, with its Wilson CI."""
    out: dict[str, dict[str, Any]] = {}
    groups = _group(rows, "arm")
    for arm in sorted(groups, key=lambda a: (order.index(a) if a in order else len(order), a)):
        group = groups[arm]
        counts = {o: sum(1 for r in group if r["outcome"] == o) for o in OUTCOMES}
        n = len(group)
        k = counts["better"] + counts["equal"]
        out[arm] = {
            "n": n,
            **counts,
            "at_least_as_good": k,
            "share": k / n if n else math.nan,
            "ci": wilson(k, n),
        }
    return out


def arm_tests(shares: Mapping[str, Mapping[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Chi-square test of every pair of arms' at-least-as-good shares, Holm-adjusted together."""
    from scipy.stats import chi2_contingency

    from fedmira.common.stats import holm_bonferroni

    tests = []
    for a, b in itertools.combinations(sorted(shares), 2):
        table = np.array(
            [[shares[x]["at_least_as_good"], shares[x]["n"] - shares[x]["at_least_as_good"]] for x in (a, b)]
        )
        if (table.sum(axis=0) == 0).any():  # both arms all one way: no difference to test
            chi2, p = 0.0, 1.0
        else:
            res = chi2_contingency(table)
            chi2, p = float(res.statistic), float(res.pvalue)
        tests.append(
            {
                "arms": (a, b),
                "share_a": shares[a]["share"],
                "share_b": shares[b]["share"],
                "chi2": chi2,
                "p": p,
            }
        )
    if tests:
        holm = holm_bonferroni([t["p"] for t in tests], alpha=alpha)
        for t, p_adj, reject in zip(tests, holm["adjusted"], holm["reject"]):
            t["p_holm"], t["reject"] = float(p_adj), bool(reject)
    return tests


def acceptability(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per system: mean acceptability (1-5) with a bootstrap CI, and each error flag's rate."""
    from fedmira.common.stats import mean_ci

    ratings: dict[str, list[int]] = defaultdict(list)
    flags: dict[str, list[list[str]]] = defaultdict(list)
    for r in rows:
        for pos in ("first", "second"):
            ratings[r[pos]].append(int(r[f"accept_{pos}"]))
            flags[r[pos]].append(list(r[f"flags_{pos}"]))
    out = {}
    for system in sorted(ratings):
        vals = ratings[system]
        m: dict[str, Any] = {"lo": math.nan, "hi": math.nan}
        if len(vals) > 1:
            m = dict(mean_ci(vals, seed=seed))
        out[system] = {
            "n": len(vals),
            "mean": float(np.mean(vals)),
            "ci": (float(m["lo"]), float(m["hi"])),
            "flags": {f: sum(f in fl for fl in flags[system]) / len(vals) for f in ERROR_FLAGS},
        }
    return out


def by_stratum(rows: Sequence[Mapping[str, Any]], key: str, order: Sequence[str] = ()
               ) -> dict[str, dict[str, dict[str, Any]]]:
    """Arm shares within each site (``key="site_id"``) or modality."""
    return {value: arm_shares(group, order) for value, group in sorted(_group(rows, key).items())}


def drafts(data: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per answered drafting task: reader, case, condition, seconds, text (kept in memory)."""
    tasks = {t["task_id"]: t for t in data["tasks"]}
    return [
        {
            "task_id": a["task_id"],
            "case_id": tasks[a["task_id"]]["case_id"],
            "reader_id": a["reader_id"],
            "condition": tasks[a["task_id"]]["condition"],
            "seconds": a["active_ms"] / 1000.0,
            "text": a["text"],
        }
        for a in data["answers"]
        if tasks[a["task_id"]]["kind"] == DRAFT
    ]


def drafting_time(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean seconds per condition and the time saved per report, paired by reader."""
    from scipy.stats import ttest_1samp, wilcoxon

    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: {SCRATCH: [], ASSISTED: []})
    for r in rows:
        per[r["reader_id"]][r["condition"]].append(r["seconds"])
    saved = [
        float(np.mean(v[SCRATCH]) - np.mean(v[ASSISTED])) for v in per.values() if v[SCRATCH] and v[ASSISTED]
    ]
    out: dict[str, Any] = {
        c: _mean_or_nan([r["seconds"] for r in rows if r["condition"] == c]) for c in (SCRATCH, ASSISTED)
    }
    out.update(
        {
            "readers_paired": len(saved),
            "saved_s": _mean_or_nan(saved),
            "saved_ci": (math.nan, math.nan),
            "wilcoxon_p": math.nan,
        }
    )
    if len(saved) >= 2 and np.ptp(saved) > 0:
        ci = ttest_1samp(saved, 0.0).confidence_interval(0.95)
        out["saved_ci"] = (float(ci.low), float(ci.high))
    elif len(saved) >= 2:  # every reader saved the same time: the interval is that point
        out["saved_ci"] = (saved[0], saved[0])
    if len(saved) >= 2 and any(s != 0 for s in saved):
        out["wilcoxon_p"] = float(wilcoxon(saved).pvalue)
    return out


def preference_alpha(rows: Sequence[Mapping[str, Any]]) -> float:
    """Krippendorff's alpha (ordinal) of the outcome over (case, arm) items read more than once."""
    return _alpha(rows, lambda r: (r["case_id"], r["arm"]), lambda r: _ORDINAL[r["outcome"]])


def acceptability_alpha(rows: Sequence[Mapping[str, Any]]) -> float:
    """Krippendorff's alpha (ordinal) of the 1-5 ratings over (case, arm, system) items."""
    flat = [
        {"reader_id": r["reader_id"], "key": (r["case_id"], r["arm"], r[pos]), "value": r[f"accept_{pos}"]}
        for r in rows
        for pos in ("first", "second")
    ]
    return _alpha(flat, lambda r: r["key"], lambda r: r["value"])


def _alpha(rows: Sequence[Mapping[str, Any]], unit: Any, value: Any) -> float:
    """Krippendorff's alpha, readers x units; NaN when no unit has two readings or values never vary."""
    import krippendorff

    readers = sorted({r["reader_id"] for r in rows})
    units = sorted({unit(r) for r in rows})
    if len(readers) < 2 or not units:
        return math.nan
    data = np.full((len(readers), len(units)), np.nan)
    ri, ui = {r: i for i, r in enumerate(readers)}, {u: i for i, u in enumerate(units)}
    for r in rows:
        data[ri[r["reader_id"]], ui[unit(r)]] = value(r)
    paired = (~np.isnan(data)).sum(axis=0) >= 2
    values = data[:, paired]
    if not paired.any() or len(np.unique(values[~np.isnan(values)])) < 2:
        return math.nan
    return float(krippendorff.alpha(reliability_data=values, level_of_measurement="ordinal"))


def draft_agreement(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean pairwise ROUGE-L between readers' impressions of a case, per condition, and paired by case."""
    from fedmira.common.metrics import rouge_l

    by: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        by[(r["case_id"], r["condition"])].append(r["text"])
    per_case: dict[str, dict[str, float]] = defaultdict(dict)
    for (case, condition), texts in by.items():
        if len(texts) >= 2:
            per_case[case][condition] = float(
                np.mean([rouge_l(a, b) for a, b in itertools.combinations(texts, 2)])
            )
    both = [v for v in per_case.values() if SCRATCH in v and ASSISTED in v]
    return {
        SCRATCH: _mean_or_nan([v[SCRATCH] for v in per_case.values() if SCRATCH in v]),
        ASSISTED: _mean_or_nan([v[ASSISTED] for v in per_case.values() if ASSISTED in v]),
        "cases_paired": len(both),
        "raised_by": _mean_or_nan([v[ASSISTED] - v[SCRATCH] for v in both]),
    }


def analyze(
    data: Mapping[str, list[dict[str, Any]]], settings: StudySettings, seed: int = 0
) -> dict[str, Any]:
    """Every table of the study's analysis (JSON-serialisable)."""
    rows = judgments(data, settings)
    order = [f"{a} vs {b}" for a, b in settings.arms]  # the settings' order in every table
    shares = arm_shares(rows, order)
    draft_rows = drafts(data)
    total = len(data["tasks"])
    return {
        "answered": len(data["answers"]),
        "tasks": total,
        "readers": len(data["readers"]),
        "pairwise": {
            "n": len(rows),
            "arms": shares,
            "tests": arm_tests(shares),
            "acceptability": acceptability(rows, seed=seed),
            "by_site": by_stratum(rows, "site_id", order),
            "by_modality": by_stratum(rows, "modality", order),
            "alpha_preference": preference_alpha(rows),
            "alpha_acceptability": acceptability_alpha(rows),
        },
        "drafting": {
            "n": len(draft_rows),
            "time": drafting_time(draft_rows) if draft_rows else {},
            "agreement": draft_agreement(draft_rows) if draft_rows else {},
        },
    }


def _group(rows: Sequence[Mapping[str, Any]], key: str) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r[key]].append(r)
    return dict(out)


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# ------------------------------------------------------------------------------------------------
# The written report
# ------------------------------------------------------------------------------------------------
def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci: Sequence[float], digits: int = 3) -> str:
    return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def report_markdown(result: Mapping[str, Any]) -> str:
    """Return the analysis as Markdown, laid out as the study's tables."""
    from fedmira.common.tables import markdown_table

    p, d = result["pairwise"], result["drafting"]
    out = [
        f"# Reader study\n\n{result['answered']} of {result['tasks']} tasks answered by "
        f"{result['readers']} readers.\n",
        "## Pairwise: rated at least as good\n",
    ]
    out.append(
        markdown_table(
            ["arm", "judgments", "better", "equal", "worse", "at least as good", "95% CI (Wilson)"],
            [
                [a, s["n"], s["better"], s["equal"], s["worse"], _f(s["share"]), _ci(s["ci"])]
                for a, s in p["arms"].items()
            ],
        )
    )
    if p["tests"]:
        out += [
            "\n## Arms against each other (chi-square, Holm-Bonferroni)\n",
            markdown_table(
                ["arm", "vs arm", "share", "vs share", "chi2", "p", "p (Holm)", "reject at 0.05"],
                [
                    [
                        t["arms"][0],
                        t["arms"][1],
                        _f(t["share_a"]),
                        _f(t["share_b"]),
                        _f(t["chi2"]),
                        _f(t["p"], 4),
                        _f(t["p_holm"], 4),
                        "yes" if t["reject"] else "no",
                    ]
                    for t in p["tests"]
                ],
            ),
        ]
    out += [
        "\n## Clinical acceptability (1-5) and error flags\n",
        markdown_table(
            ["system", "ratings", "mean", "95% CI", *ERROR_FLAGS],
            [
                [s, v["n"], _f(v["mean"], 2), _ci(v["ci"], 2), *(_f(v["flags"][f]) for f in ERROR_FLAGS)]
                for s, v in p["acceptability"].items()
            ],
        ),
    ]
    for title, key in (("site", "by_site"), ("modality", "by_modality")):
        out += [
            f"\n## At least as good, per {title}\n",
            markdown_table(
                [title, "arm", "judgments", "share", "95% CI"],
                [
                    [v, a, s["n"], _f(s["share"]), _ci(s["ci"])]
                    for v, arms in p[key].items()
                    for a, s in arms.items()
                ],
            ),
        ]
    out += [
        "\n## Agreement between readers\n",
        f"Krippendorff's alpha (ordinal): preference {_f(p['alpha_preference'])}, acceptability "
        f"{_f(p['alpha_acceptability'])}.",
    ]
    if d["n"]:
        t, g = d["time"], d["agreement"]
        out += [
            "\n## Drafting (crossover)\n",
            markdown_table(
                ["condition", "mean active s per report", "readers' ROUGE-L agreement"],
                [[c, _f(t[c], 1), _f(g[c])] for c in (SCRATCH, ASSISTED)],
            ),
            f"\nTime saved per report with the draft: {_f(t['saved_s'], 1)} s, "
            f"95% CI {_ci(t['saved_ci'], 1)} "
            f"(paired by reader, {t['readers_paired']} readers; Wilcoxon p {_f(t['wilcoxon_p'], 4)}). "
            f"Agreement raised by the draft: {_f(g['raised_by'])} ROUGE-L ({g['cases_paired']} cases).",
        ]
    return "\n".join(out) + "\n"


def write_report(
    folder: Path, result: Mapping[str, Any], data: Mapping[str, list[dict[str, Any]]], settings: StudySettings
) -> dict[str, Path]:
    """Write ``report.md``, ``summary.json``, ``judgments.csv``, ``drafts.csv`` (no report text) and plots."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": folder / "report.md",
        "summary": folder / "summary.json",
        "judgments": folder / "judgments.csv",
        "drafts": folder / "drafts.csv",
        "plot": folder / "shares.png",
    }
    paths["report"].write_text(report_markdown(result), encoding="utf-8")
    paths["summary"].write_text(json.dumps(result, indent=2, default=_json), encoding="utf-8")
    rows = judgments(data, settings)
    _csv(
        paths["judgments"],
        [{k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows],
    )
    _csv(
        paths["drafts"],
        [{k: v for k, v in r.items() if k != "text"} | {"chars": len(r["text"])} for r in drafts(data)],
    )
    _plot(paths["plot"], result, drafts(data))
    return paths


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = ()) -> None:
    """Plot each arm's share rated at least as good (bars, Wilson CI), and the drafting times.

    With drafting answers, a second panel has one line per reader from their mean active
    seconds per report from scratch to theirs with the draft (the paired design).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["pairwise"]["arms"]
    names = list(arms)
    panels = 2 if rows else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(4.0, 1.6 * len(names)) + 3.5 * (panels - 1), 3.4),
                             squeeze=False)
    ax = axes[0][0]
    if names:
        shares = [arms[a]["share"] for a in names]
        lows = [arms[a]["share"] - arms[a]["ci"][0] for a in names]
        highs = [arms[a]["ci"][1] - arms[a]["share"] for a in names]
        ax.bar(names, shares, yerr=[lows, highs], capsize=4, color="#4c72b0")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("rated at least as good")
    ax.set_title("Pairwise judgments (95% Wilson CI)")
    ax.tick_params(axis="x", labelrotation=15)
    if rows:
        ax2 = axes[0][1]
        per: dict[int, dict[str, list[float]]] = defaultdict(lambda: {SCRATCH: [], ASSISTED: []})
        for r in rows:
            per[r["reader_id"]][r["condition"]].append(r["seconds"])
        for _, v in sorted(per.items()):
            if v[SCRATCH] and v[ASSISTED]:
                ax2.plot([0, 1], [np.mean(v[SCRATCH]), np.mean(v[ASSISTED])], marker="o", color="#999")
        ax2.set_xticks([0, 1], ["from scratch", "with the draft"])
        ax2.set_xlim(-0.4, 1.4)
        ax2.set_ylabel("active seconds per report")
        ax2.set_title("Drafting, per reader")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
