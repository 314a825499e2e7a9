"""Can choosing among candidates lift a RAG adapter above retrieval? A measurement, not a feature.

For a run's final adapter (``site_aware_rag`` prompts), on the held-out test reports that
``fedmira evaluate`` scores, this script collects per report: the adapter's ``--beams`` beam
outputs with their length-normalised log-probabilities, the impressions of the site's prior
cases in the prompt and the adapter's mean token log-probability of each of them. It then
scores selection rules offline (beam 1, minimum-Bayes-risk by ROUGE-L over beams and prior
cases, the prior case the adapter finds most likely, and mixtures) against pooled TF-IDF
retrieval with paired Wilcoxon tests. Candidates go to ``--out`` (JSON lines, report text: keep
it at the site, it is written under the run folder by default), so rules can be re-scored
with ``--score-only``.

    python -m fedmira.simulations.scripts.selection_probe RUN_DIR [--beams 4] [--limit 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import wilcoxon
from tqdm import tqdm

from fedmira.common.baselines import retrieve_impressions
from fedmira.common.compare import held_out_and_pool
from fedmira.common.config import ExperimentConfig
from fedmira.common.inference import load_model_with_adapter
from fedmira.common.metrics import rouge_l
from fedmira.common.prompts import collate_left, prompt_ids
from fedmira.common.retrieval import rag_neighbors


def _mean_logprob(model: Any, prompt: list[int], targets: list[list[int]], pad: int) -> list[float]:
    """Mean token log-probability of each target continuation of ``prompt``."""
    seqs = [prompt + t for t in targets]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    p = len(prompt)
    return [float(logp[k, p - 1 : len(s) - 1].gather(1, torch.tensor(s[p:])[:, None]).mean())
            for k, s in enumerate(seqs)]


@torch.no_grad()
def collect(run_dir: Path, beams: int, limit: int, out: Path) -> None:
    """Write one JSON line of candidates per held-out report of ``run_dir``'s configuration."""
    cfg = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    reports, _, pool = held_out_and_pool(cfg, limit, sys.stderr)
    near = rag_neighbors(cfg, reports, pool) or [() for _ in reports]
    retrieved = retrieve_impressions(pool, reports)
    model, tok, device = load_model_with_adapter(cfg, str(run_dir / "final_adapter"))
    pad, eos = int(tok.pad_token_id), int(tok.eos_token_id)
    max_prompt = max(8, cfg.data.max_length - cfg.generate.max_new_tokens)
    with out.open("w") as f:
        for r, n, ret in tqdm(list(zip(reports, near, retrieved)), desc="candidates", unit="report"):
            prompt = prompt_ids(r, tok, cfg.data.template, max_prompt, neighbors=n,
                                neighbor_tokens=cfg.data.neighbor_tokens, preamble=cfg.data.preamble)
            batch = {k: v.to(device) for k, v in collate_left([prompt], pad).items()}
            o = model.generate(**batch, max_new_tokens=cfg.generate.max_new_tokens, num_beams=beams,
                               num_return_sequences=beams, do_sample=False, eos_token_id=eos,
                               pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
            texts = [tok.decode(s[len(prompt):], skip_special_tokens=True).strip() for s in o.sequences]
            cases = [c.impression for c in n]
            lps = _mean_logprob(model, prompt, [list(tok(c, add_special_tokens=False)["input_ids"]) + [eos]
                                                for c in cases], pad) if cases else []
            f.write(json.dumps({"report_id": r.report_id, "reference": r.impression, "retrieval": ret,
                                "beams": texts, "beam_lp": o.sequences_scores.tolist(),
                                "cases": cases, "case_lp": lps}) + "\n")


def _mbr(cands: list[str], evidence: list[str], bonus: list[float], lam: float) -> str:
    """Candidate with the highest mean ROUGE-L against ``evidence`` plus ``lam`` x its bonus."""
    gains = [np.mean([rouge_l(e, c) for e in evidence]) + lam * b for c, b in zip(cands, bonus)]
    return cands[int(np.argmax(gains))]


RULES: dict[str, Callable[[dict[str, Any]], str]] = {
    "beam 1": lambda r: r["beams"][0],
    "MBR over beams": lambda r: _mbr(r["beams"], r["beams"], r["beam_lp"], 0.0),
    "beams by MBR vs beams + cases": lambda r: _mbr(r["beams"], r["beams"] + r["cases"], r["beam_lp"], 0.0),
    "medoid of the prior cases": lambda r: _mbr(r["cases"], r["cases"], r["case_lp"], 0.0),
    "prior case the adapter finds likeliest": lambda r: r["cases"][int(np.argmax(r["case_lp"]))],
    "MBR beams + cases, + 0.2 x log-prob": lambda r: _mbr(r["beams"] + r["cases"], r["beams"] + r["cases"],
                                                          r["beam_lp"] + r["case_lp"], 0.2),
}


def score(path: Path) -> None:
    """Print each rule's ROUGE-L beside pooled retrieval's, with the paired Wilcoxon p."""
    rows = [json.loads(line) for line in path.open()]
    base = np.array([rouge_l(r["reference"], r["retrieval"]) for r in rows])
    print(f"{len(rows)} reports; retrieval (TF-IDF, all sites) ROUGE-L {base.mean():.4f}")
    for name, rule in RULES.items():
        got = np.array([rouge_l(r["reference"], rule(r)) for r in rows])
        d = got - base
        p = float(wilcoxon(d[d != 0]).pvalue) if np.any(d != 0) else 1.0
        print(f"{name:42s} {got.mean():.4f}  diff {d.mean():+.4f}  Wilcoxon p {p:.3f} (unadjusted)")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, collect the candidates unless told not to, and score the rules."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a fedmira simulate run folder with final_adapter/")
    ap.add_argument("--beams", type=int, default=4, help="beams (and candidates) per report")
    ap.add_argument("--limit", type=int, default=300, help="held-out reports, as fedmira evaluate --limit")
    ap.add_argument("--out", type=Path, help="candidates file (default RUN_DIR/selection_probe.jsonl)")
    ap.add_argument("--score-only", action="store_true", help="re-score an existing candidates file")
    args = ap.parse_args(argv)
    out = args.out or args.run_dir / "selection_probe.jsonl"
    if not args.score_only:
        collect(args.run_dir, args.beams, args.limit, out)
    score(out)


if __name__ == "__main__":
    main()
