"""``fedmira``: the one command, with subcommands. Parses and wires; the work is elsewhere.

Every subcommand takes Hydra overrides (``key=value``, ``group=option``, ``+experiment=name``)
composed from ``conf/``. User errors (bad config, bad data, missing model) print one message
that says what to do and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from fedmira.common import exit_codes
from fedmira.common.errors import FedmiraError

EPILOG_OVERRIDES = """\
Overrides (any number, after the options):
  key=value            e.g. train.lr=1e-3 strategy.rounds=5 data.path=/data/reports.csv
  group=option         e.g. model=tiny lora=r16_all partition=iid data=iu_xray
  +experiment=NAME     a named experiment from conf/experiment/
  +debug=tiny          tiny random model, 3 sites, 2 rounds (seconds)
Run `fedmira config` to list every key with its default and meaning.
"""

INPUT_HELP = ("report file (JSONL, CSV or IU CSV) scored as it is: every report, as an external site, "
              "no re-splitting of data.path; bad rows are skipped and counted (data.policy)")
PRIOR_HELP = ("with --input: that hospital's own prior reports, the retrieval index of site_aware_rag "
              "prompts. Matched by site_id: it must hold only the --input file's site ids (else an "
              "error names both sets); a report id in both files is never its own prior")


def _compose(overrides: Sequence[str]):  # type: ignore[no-untyped-def]
    from fedmira.common.compose import compose_config

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    return compose_config(overrides)


# ---------------------------------------------------------------------------------- commands
def cmd_data_check(args: argparse.Namespace) -> int:
    """Run ``fedmira data check``: validate a report file and print its profile."""
    from fedmira.common.reports import check_data

    cfg = _compose(args.overrides)
    count_tokens: Callable[[str], int] | None = None
    if args.tokens:
        from fedmira.common.model import load_base_model

        tok = load_base_model(cfg.model).tokenizer
        count_tokens = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    fmt = args.format or cfg.data.format
    return check_data(args.path, fmt=fmt, policy=cfg.data.policy, max_chars=cfg.data.max_chars,
                      count_tokens=count_tokens, max_problems_shown=args.max_problems)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``fedmira train``: centralized (or ``--site``) LoRA training, ``train=centralized`` by default."""
    from fedmira.simulations.centralized import train_centralized

    overrides = list(args.overrides)
    if not any(o.startswith("train=") for o in overrides):
        overrides.insert(0, "train=centralized")
    train_centralized(_compose(overrides), site=args.site)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``fedmira generate``: impressions for the input reports, to ``--output`` or stdout."""
    from fedmira.common.inference import generate_impressions, read_input, write_impressions

    cfg = _compose(args.overrides)
    reports = read_input(args.input, cfg.data.format, site=args.site, modality=args.modality,
                         body_part=args.body_part, exam=args.exam)
    if args.limit:
        reports = reports[: args.limit]
    impressions = generate_impressions(cfg, reports, args.adapter)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            write_impressions(reports, impressions, f)
        print(f"{len(reports)} impressions written to {args.output}", file=sys.stderr)
    else:
        write_impressions(reports, impressions, sys.stdout)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedmira simulate``: a federated simulation (or resume one, ``run.resume``)."""
    from fedmira.simulations.launch import simulate

    cfg = _compose(args.overrides)
    return simulate(cfg, resume_overrides=args.overrides if cfg.run.resume else (), verbose=args.verbose)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``fedmira evaluate``: score an adapter on held-out reports."""
    from fedmira.simulations.evaluate_cli import evaluate_command

    return evaluate_command(args.overrides, args.adapter, args.out, args.limit, args.no_encoder,
                            input=args.input, prior=args.prior)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``fedmira compare``: systems on one held-out set, with paired tests."""
    from fedmira.simulations.compare_cli import compare_command

    return compare_command(args.overrides, args.system, reference=args.reference, out=args.out,
                           cache=args.cache, limit=args.limit, zero_shot=not args.no_zero_shot,
                           baselines=not args.no_baselines, no_encoder=args.no_encoder,
                           resamples=args.resamples, permutations=args.permutations,
                           input=args.input, prior=args.prior)


def cmd_audit(args: argparse.Namespace) -> int:
    """Run ``fedmira audit``: the canary memorization audit."""
    from fedmira.simulations.audit_cli import AuditPlan, audit_command

    plan = AuditPlan(canaries=args.canaries, repeats=args.repeats, candidates=args.candidates,
                     sites=args.sites, seed=args.seed)
    return audit_command(args.overrides, plan, args.out)


def cmd_partition(args: argparse.Namespace) -> int:
    """Run ``fedmira partition``: write the site folders to ``out=DIR`` (or ``--out``)."""
    from fedmira.simulations.partition_cli import run_partition

    out = args.out
    overrides = []
    for o in args.overrides:  # `out=DIR` reads like an override but is this command's own
        if o.startswith("out="):
            out = o.split("=", 1)[1]
        else:
            overrides.append(o)
    if not out:
        raise FedmiraError("fedmira partition needs an output folder: out=DIR (or --out DIR).")
    run_partition(_compose(overrides), out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``fedmira export``: a run's adapter and model card (and, with ``--merge``, the merged model)."""
    from fedmira.common.export import export_run

    target = export_run(args.run_dir, args.out, merge=args.merge)
    print(f"Exported to {target}: adapter/ (PEFT), README.md (model card)"
          + (", merged/ (base + adapter, Hugging Face format)" if args.merge else ""))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Run ``fedmira config``: print every config key with its value and meaning, by section."""
    from fedmira.common.config import help_table

    cfg = _compose(args.overrides)
    values = cfg.to_run_config()
    section = ""
    for key, _default, text in help_table():
        head = key.split(".", 1)[0]
        if head != section:
            section = head
            print(f"\n[{section}]")
        print(f"  {key} = {values[key]!r}\n      {text}")
    from fedmira.common.memory import config_report

    print(f"\n[memory estimate for training at a site]\n{config_report(cfg)}")
    return 0


# ---------------------------------------------------------------------------------- parser
# ---------------------------------------------------------------------------------- deployment
OVERRIDES_HELP = ("Hydra overrides (key=value, group=option, +debug=tiny); the coordinator's define the run, "
                  "a hospital's only what its preflight checks (model, lora, data format)")


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Run ``fedmira coordinator``: the deployment's SuperLink and rounds."""
    from fedmira.server.coordinator import coordinator_command

    return coordinator_command(args.overrides, certs=args.certs, allow_list=args.allow_list,
                               wait_sites=args.wait_sites, verbose=args.verbose)


def cmd_hospital(args: argparse.Namespace) -> int:
    """Run ``fedmira hospital``: preflight checks, then this hospital's SuperNode."""
    from fedmira.client.hospital import hospital_command

    return hospital_command(args.overrides, superlink=args.superlink, root_cert=args.root_cert, key=args.key,
                            data=args.data, site_id=args.site_id, workdir=args.workdir,
                            isolation=args.isolation, site_index=args.site_index,
                            node_config=args.node_config or (), dry_run=not args.no_dry_run,
                            preflight_only=args.preflight_only)


def cmd_certs(args: argparse.Namespace) -> int:
    """Run ``fedmira certs``: a CA, the SuperLink certificate and hospital key pairs in ``out=DIR``."""
    from fedmira.server.certs import certs_command

    out = args.out
    for item in args.rest:  # `out=DIR` reads like an override but is this command's own
        if item.startswith("out="):
            out = item.split("=", 1)[1]
        else:
            raise FedmiraError(f"Unexpected argument {item!r}; fedmira certs takes out=DIR and options.")
    if not out:
        raise FedmiraError("fedmira certs needs an output folder: out=DIR (or --out DIR).")
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    return certs_command(out, args.hospitals, names=names, hosts=args.host, days=args.days)


def add_deploy_commands(sub: Any) -> None:
    """Add the ``coordinator``, ``hospital`` and ``certs`` subcommands to ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    co = sub.add_parser(
        "coordinator", formatter_class=fmt,
        help="run a federated deployment: SuperLink with TLS and node auth",
        description="Start the coordinator's Flower SuperLink (HTTPS with --certs, SuperNode authentication "
                    "with the hospitals' keys from --allow-list, state database shared by the "
                    "coordinator's runs, mode.state_db), wait "
                    "until the hospitals are online, run the rounds and write the run folder a simulation "
                    "writes. Hospitals connect to mode.superlink (default 127.0.0.1:9092; 0.0.0.0:9092 for "
                    "other machines), which serves only the Fleet API; the Control API (flwr CLI) and the "
                    "ServerApp's API listen on 127.0.0.1:mode.control_port (0: a free port; printed at "
                    "start). Only allow-listed keys take part in a round. Resume with run.resume=RUN_DIR "
                    "(the launch's --certs, --allow-list and --wait-sites are kept; overrides may move "
                    "mode.superlink but not change what the run trains).\n\n"
                    f"{exit_codes.TABLE}.\n\n"
                    "  fedmira coordinator --certs pki mode.superlink=0.0.0.0:9092 strategy.rounds=5")
    co.add_argument("--certs",
                    help="folder with ca.crt, server.crt, server.key (or a `fedmira certs` folder)")
    co.add_argument("--allow-list", help="hospitals' public keys, one OpenSSH line each "
                                         "(default: CERTS/allowed_supernodes.txt)")
    co.add_argument("--wait-sites", type=int, default=0,
                    help="start when this many hospitals are online (default: all on the allow-list)")
    co.add_argument("-v", "--verbose", action="store_true", help="stream all Flower logs")
    co.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    co.set_defaults(func=cmd_coordinator)

    ho = sub.add_parser(
        "hospital", formatter_class=fmt, help="preflight checks, then this hospital's SuperNode",
        description="Check this hospital's reports, device and base model, show what will leave the "
                    "hospital, verify the coordinator's certificate, then connect with the node key and "
                    "train when the coordinator asks. Only LoRA adapter tensors and numeric metrics "
                    "leave.\n\n"
                    "  fedmira hospital --superlink coord.example.org:9092 --root-cert ca.crt "
                    "--key supernode_key --data /data/reports.jsonl --site-id st_marys")
    ho.add_argument("--superlink", help="coordinator address HOST:PORT (default: mode.superlink)")
    ho.add_argument("--root-cert", required=True, help="the coordinator's CA certificate (ca.crt)")
    ho.add_argument("--key", required=True, help="this hospital's node private key (supernode_key)")
    ho.add_argument("--data", required=True, help="folder with train.jsonl/val.jsonl, or one report file")
    ho.add_argument("--site-id", help="this hospital's name in metrics (default: folder or file name)")
    ho.add_argument("--workdir", help="local working folder (default: ./fedmira-SITE_ID): split data, logs")
    ho.add_argument("--isolation", choices=["warm", "subprocess"], default="warm",
                    help="warm: keep the model loaded between rounds (default); subprocess: Flower's default")
    ho.add_argument("--site-index", type=int, help="seed offset of this site (default: from the site id)")
    ho.add_argument("--node-config", action="append", metavar="KEY=VALUE",
                    help="extra node config, e.g. lora-rank=4 (repeatable)")
    ho.add_argument("--no-dry-run", action="store_true", help="skip the one-step dry run of the preflight")
    ho.add_argument("--preflight-only", action="store_true", help="check everything, then exit")
    ho.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ho.set_defaults(func=cmd_hospital)

    ce = sub.add_parser(
        "certs", formatter_class=fmt, help="development CA, SuperLink certificate, hospital keys, allow-list",
        description="Write a development PKI: a CA, the SuperLink's certificate (SAN 127.0.0.1, localhost "
                    "and --host), one ECDSA P-384 node key pair per hospital and the allow-list. For "
                    "pilots and tests; docs/deployment.md explains using your own PKI.\n\n"
                    "  fedmira certs out=pki --hospitals 3 --host coord.example.org")
    ce.add_argument("--out", help="output folder (or out=DIR)")
    ce.add_argument("--hospitals", type=int, default=3, help="number of hospital key pairs (default 3)")
    ce.add_argument("--names", help="comma-separated hospital names instead of hospital_01..")
    ce.add_argument("--host", action="append", default=[],
                    help="extra SAN of the SuperLink certificate (repeatable)")
    ce.add_argument("--days", type=int, default=365, help="certificate validity in days")
    ce.add_argument("rest", nargs="*", help="out=DIR")
    ce.set_defaults(func=cmd_certs)


def cmd_reader_study(args: argparse.Namespace) -> int:
    """Run ``fedmira reader-study create | serve | analyze``."""
    from fedmira.simulations import reader_study_cli as rs

    action: Callable[[argparse.Namespace], int] = {"create": rs.create, "serve": rs.serve_cmd,
                                                   "analyze": rs.analyze_cmd}[args.study_command]
    return action(args)


def add_reader_study_commands(sub: Any) -> None:
    """``fedmira reader-study create | serve | analyze``."""
    fmt = argparse.RawDescriptionHelpFormatter
    rs = sub.add_parser(
        "reader-study", formatter_class=fmt,
        help="radiologists judge the impressions, blinded, in a web page",
        description="A reader study on a hospital's own reports, as in the study fedmira follows:\n"
                    "  create   sample cases, assign readers (balanced, seeded), make login tokens\n"
                    "  serve    the reading page (pairwise A/B judgments; drafting with or without the "
                    "model's draft)\n"
                    "  analyze  shares at least as good (Wilson CIs), chi-square + Holm, time saved, "
                    "agreement\n\n"
                    "  fedmira reader-study create --compare outputs/compare/STAMP \\\n"
                    "      --reader 'Dr A@Centre 1' \\\n"
                    "      --reader 'Dr B@Centre 2' --reader 'Dr C@Centre 1' --reader 'Dr D@Centre 2' \\\n"
                    "      --draft-cases 10 --draft-system fedavg --out studies/s1\n"
                    "  fedmira reader-study serve studies/s1\n"
                    "  fedmira reader-study analyze studies/s1")
    rs_sub = rs.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    cr = rs_sub.add_parser("create", help="sample cases and assign readers; write the study folder",
                           description="Write OUT/study.sqlite (cases, arms, readers, tasks) and "
                                       "OUT/tokens.csv (each reader's login link; owner-readable only).")
    src = cr.add_mutually_exclusive_group(required=True)
    src.add_argument("--compare", metavar="DIR", help="a `fedmira compare` output folder (its cases.jsonl "
                                                       "and predictions/*.jsonl)")
    src.add_argument("--cases", metavar="FILE", help="JSONL: report_id, site_id, modality, findings, "
                                                      "reference, candidates {system: impression}")
    cr.add_argument("--arm", action="append", default=[], metavar="SYSTEM:OTHER",
                    help="a pairwise arm, e.g. fedavg:reference or fedavg:central (repeat; default: "
                         "every system against the reference)")
    cr.add_argument("--reader", action="append", default=[], metavar="NAME[@CENTRE]",
                    help="a reader (repeat)")
    cr.add_argument("--readers", metavar="CSV", help="readers from a CSV with columns name,centre")
    cr.add_argument("--n-cases", type=int, default=40,
                    help="cases of the pairwise task (default 40), stratified by site and modality")
    cr.add_argument("--draft-cases", type=int, default=0, help="cases of the drafting task (default 0: none)")
    cr.add_argument("--draft-system", help="the system whose impression is the draft")
    cr.add_argument("--readers-per-item", type=int, default=2,
                    help="readers per pairwise item and per drafting condition (default 2, for agreement)")
    cr.add_argument("--seed", type=int, default=0, help="sampling and assignment seed")
    cr.add_argument("--out", required=True, help="the study folder to create (must not hold a study)")
    se = rs_sub.add_parser("serve", help="run the reading page",
                           description="Serve the reading page for STUDY. Loopback only unless --host "
                                       "names another address, which needs --tls-cert/--tls-key.")
    se.add_argument("study", help="the study folder")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    se.add_argument("--tls-cert", help="TLS certificate (e.g. the coordinator's certs/superlink.crt)")
    se.add_argument("--tls-key", help="TLS private key")
    an = rs_sub.add_parser("analyze", help="the study's statistics: report.md, CSV, JSON, plots",
                           description="Analyze STUDY's answers so far into STUDY/analysis/ (or --out).")
    an.add_argument("study", help="the study folder")
    an.add_argument("--out", help="output folder (default: STUDY/analysis)")
    for p in (cr, se, an):
        p.set_defaults(func=cmd_reader_study)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedmira`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="fedmira",
        description="Federated LoRA fine-tuning of a radiology-report model (findings -> impression). "
                    "Reports never leave a hospital; only adapter weights do.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  fedmira simulate                      # 42 synthetic hospitals, SmolLM2\n"
               "  fedmira data check reports.csv        # validate a hospital's export\n"
               "  fedmira train data.path=reports.csv   # centralized baseline\n"
               "  fedmira generate --adapter RUN/final_adapter --input reports.jsonl\n\n"
               + EPILOG_OVERRIDES,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    data = sub.add_parser("data", help="inspect report files")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_sub.add_parser(
        "check", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="validate a report file and print its profile",
        description="Validate a report file (JSONL, CSV or the IU/Open-i CSV): one line per problem "
                    "naming file, line, report id, field and the fix; then rows kept/skipped, sites, "
                    "modalities and lengths. Exit 0 when usable reports remain, 1 when none, 2 when "
                    "the file cannot be read. Report text is never printed.")
    check.add_argument("path", help="report file")
    check.add_argument("--format", choices=["auto", "jsonl", "csv", "iu"], help="override data.format")
    check.add_argument("--tokens", action="store_true", help="also count tokens with the model's tokenizer")
    check.add_argument("--max-problems", type=int, default=50, help="problems listed before summarising")
    check.add_argument("overrides", nargs="*", help="Hydra overrides")
    check.set_defaults(func=cmd_data_check)

    train = sub.add_parser(
        "train", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="centralized or single-site LoRA training",
        description="LoRA fine-tuning on pooled reports (the centralized baseline) or one site's "
                    "reports (--site). Uses conf/train/centralized.yaml unless train=... is given. "
                    "Prints held-out loss before and after and saves the adapter (PEFT format).")
    train.add_argument("--site", help="train on this site's reports only")
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser(
        "generate", formatter_class=fmt, epilog=EPILOG_OVERRIDES, help="write impressions from findings",
        description="Generate impressions with the base model, or with an adapter (--adapter). Input "
                    "is a report file or '-' for stdin (one JSON report or one findings text per "
                    "line). Output: JSON lines {report_id, site_id, impression}.")
    gen.add_argument("--input", default="-", help="report file, or - for stdin (default)")
    gen.add_argument("--output", help="JSONL file to write (default: stdout)")
    gen.add_argument("--adapter", help="PEFT adapter folder (e.g. RUN_DIR/final_adapter)")
    gen.add_argument("--limit", type=int, default=0, help="only the first N reports of the input")
    gen.add_argument("--site", default="site", help="site id for stdin findings")
    gen.add_argument("--modality", default="DR", help="modality for stdin findings (CT, MR, DR, ...)")
    gen.add_argument("--body-part", default="chest", help="body part for stdin findings")
    gen.add_argument("--exam", default="", help="exam description for stdin findings")
    gen.add_argument("overrides", nargs="*", help="Hydra overrides")
    gen.set_defaults(func=cmd_generate)

    sim = sub.add_parser(
        "simulate", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="federated fine-tuning of simulated hospitals on this machine (the main job)",
        description="Split the reports into simulated hospitals and fine-tune one LoRA adapter "
                    "with Flower's simulation engine. Writes a run folder (config + hashes, "
                    "metrics per round, adapter per round, final adapter, loss plot). Resume an "
                    "interrupted run with run.resume=RUN_DIR (overrides given with it may not change "
                    "the recorded config).\n\n" + exit_codes.TABLE + ".")
    sim.add_argument("-v", "--verbose", action="store_true", help="stream all Flower logs")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides")
    sim.set_defaults(func=cmd_simulate)

    ev = sub.add_parser(
        "evaluate", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="score generated impressions: similarity, clinical F1, per site/modality, internal vs external",
        description="Generate impressions for held-out reports (the test splits of the training "
                    "sites plus every report of external sites, as split by the partition config) "
                    "with the base model (zero-shot) or base + adapter, then score them: ROUGE-1/2/L, "
                    "BLEU-4, BERTScore-F1 and sentence similarity with the local all-MiniLM-L6-v2, "
                    "and a negation-aware clinical F1 (CheXpert observations for chest). Writes "
                    "report.md/json, per_sample.csv (ids and scores only), predictions.jsonl and "
                    "plots, with bootstrap confidence intervals.\n\n"
                    "With --input FILE a new hospital's file is scored as it is: every report, no "
                    "re-splitting, all in the external group (data.path and partition are not used). "
                    "With --prior FILE (the hospital's own earlier reports) site_aware_rag prompts "
                    "retrieve from that archive; without it they say there are no prior reports.\n\n"
                    "  fedmira evaluate --adapter RUN_DIR/final_adapter data=iu_xray data.path=...\n"
                    "  fedmira evaluate --adapter RUN_DIR/final_adapter --input new_site.jsonl \\\n"
                    "      --prior new_site_archive.jsonl data.template=site_aware_rag data.neighbors=2")
    ev.add_argument("--adapter", help="PEFT adapter folder; without it the base model is evaluated zero-shot")
    ev.add_argument("--input", metavar="FILE", help=INPUT_HELP)
    ev.add_argument("--prior", metavar="FILE", help=PRIOR_HELP)
    ev.add_argument("--out", help="output folder (default: <run.out_dir>/eval/<timestamp>)")
    ev.add_argument("--limit", type=int, default=None,
                    help="held-out reports of data.path to score (0: all; default 200); not with --input")
    ev.add_argument("--no-encoder", action="store_true", help="skip BERTScore and similarity (faster)")
    ev.add_argument("overrides", nargs="*", help="Hydra overrides")
    ev.set_defaults(func=cmd_evaluate)

    audit = sub.add_parser(
        "audit", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="memorization audit: canaries' exposure with and without DP",
        description="Plant synthetic canary reports (impression = 'Follow-up code <6 random digits>.') "
                    "--repeats times each in the first site's training data, train the global adapter "
                    "twice (FedAvg over --sites sites, strategy.rounds x train.steps; once without DP, "
                    "once with the privacy.* settings and DP on), then measure for the base model and "
                    "both adapters each canary's exposure (log2(candidates+1) - log2(rank of the secret "
                    "among --candidates random secrets), in bits) and whether greedy decoding writes "
                    "the secret. Writes audit.md, audit.json and exposure.png. Secrets and report "
                    "text are never printed.\n\n"
                    "  fedmira audit                                    # embedded SmolLM2, synthetic sites\n"
                    "  fedmira audit --sites 1 --canaries 2 --repeats 16 --candidates 127 \\\n"
                    "      strategy.rounds=1 train.steps=24 train.lr=5e-3  # memorizes without DP (~6 min)\n"
                    "  fedmira audit privacy.target_epsilon=4 train.lr=1e-3\n"
                    "  fedmira audit +debug=tiny --canaries 2           # seconds, tiny random model")
    audit.add_argument("--canaries", type=int, default=4, help="number of canaries (default 4)")
    audit.add_argument("--repeats", type=int, default=8, help="copies of each canary planted (default 8)")
    audit.add_argument("--candidates", type=int, default=255,
                       help="random candidate secrets each canary is ranked against "
                            "(default 255: max 8 bits)")
    audit.add_argument("--sites", type=int, default=2,
                       help="sites trained, canaries in the first (default 2)")
    audit.add_argument("--seed", type=int, default=0, help="seed of canaries and candidates")
    audit.add_argument("--out", help="output folder (default <run.out_dir>/audit/<timestamp>)")
    audit.add_argument("overrides", nargs="*",
                       help="Hydra overrides (privacy.*, train.*, strategy.rounds, ...)")
    audit.set_defaults(func=cmd_audit)

    from fedmira.simulations.compare_cli import DESCRIPTION as COMPARE_DESCRIPTION
    from fedmira.simulations.compare_cli import SYSTEM_HELP

    cmp = sub.add_parser(
        "compare", formatter_class=fmt, epilog=EPILOG_OVERRIDES, description=COMPARE_DESCRIPTION,
        help="compare adapters, zero-shot and baselines on one held-out set, with paired tests")
    cmp.add_argument("--system", action="append", default=[], metavar="NAME=PATH[:TEMPLATE]",
                     help=SYSTEM_HELP)
    cmp.add_argument("--reference", help="system tested against all others (default: the first --system, "
                                         "else zero_shot)")
    cmp.add_argument("--limit", type=int, default=None,
                     help="held-out reports (0: all; default 200), chosen as by `fedmira evaluate`; "
                          "not with --input")
    cmp.add_argument("--input", metavar="FILE", help=INPUT_HELP)
    cmp.add_argument("--prior", metavar="FILE", help=PRIOR_HELP + "; also the baselines' training pool "
                     "(required for them with --input: else pass --no-baselines)")
    cmp.add_argument("--out", help="output folder (default: <run.out_dir>/compare/<timestamp>)")
    cmp.add_argument("--cache", help="prediction cache (default: <run.out_dir>/compare/cache)")
    cmp.add_argument("--no-zero-shot", action="store_true", help="leave out the base model zero-shot")
    cmp.add_argument("--no-baselines", action="store_true", help="leave out retrieval and most-frequent")
    cmp.add_argument("--no-encoder", action="store_true", help="skip BERTScore and similarity (faster)")
    cmp.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    cmp.add_argument("--permutations", type=int, default=10000,
                     help="paired randomization sign flips (default 10000)")
    cmp.add_argument("overrides", nargs="*", help="Hydra overrides")
    cmp.set_defaults(func=cmd_compare)

    part = sub.add_parser(
        "partition", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
        help="split reports into hospitals' folders, with manifest, summary and plot",
        description="Split the reports (data.path, or the synthetic corpus) into simulated "
                    "hospitals as `fedmira simulate` would: natural, iid, dirichlet (label skew), "
                    "quantity (long-tailed sizes) or template (IU pseudo-sites by reporting "
                    "workflow), with external sites held out and per-site train/val/test. Writes "
                    "one folder per site, manifest.json (report id -> site, split; seed, hash), "
                    "summary.csv/.md and sites.png.\n\n  fedmira partition out=splits/iu "
                    "data=iu_xray partition=template")
    part.add_argument("--out", help="output folder (or out=DIR among the overrides)")
    part.add_argument("overrides", nargs="*", help="Hydra overrides, and out=DIR")
    part.set_defaults(func=cmd_partition)

    exp = sub.add_parser(
        "export", help="final adapter + model card (+ merged model) from a run folder",
        description="Write RUN_DIR's final adapter (PEFT format) and a model card (config and "
                    "locked-part hashes, data per site, rounds, strategy, privacy, evaluation) to "
                    "--out (default RUN_DIR/export). --merge also writes the base model with the "
                    "adapter merged, as a plain Hugging Face folder for serving.")
    exp.add_argument("run_dir", help="a run folder written by fedmira simulate")
    exp.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    exp.add_argument("--merge", action="store_true", help="also write the merged model")
    exp.set_defaults(func=cmd_export)

    add_deploy_commands(sub)  # coordinator, hospital, certs
    add_reader_study_commands(sub)

    conf = sub.add_parser("config", formatter_class=fmt, epilog=EPILOG_OVERRIDES,
                          help="print every config key with its value and meaning")
    conf.add_argument("overrides", nargs="*", help="Hydra overrides")
    conf.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmira`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args))
    except FedmiraError as exc:
        print(f"fedmira: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except KeyboardInterrupt:
        print("fedmira: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
