"""Argument parsing for ``fedmira coordinator``, ``fedmira hospital`` and ``fedmira certs``.

Wiring into ``common/cli.py`` is one call in ``build_parser``::

    from simulations.deploy_cli import add_deploy_commands
    add_deploy_commands(sub)          # sub = parser.add_subparsers(...)

Until then (and in the tests) the same commands run as ``python -m simulations.deploy_cli
{coordinator,hospital,certs} ...``. The functions here only parse and call
``simulations.deploy.coordinator_command``, ``simulations.hospital.hospital_command`` and
``simulations.certs.certs_command``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from common import exit_codes
from common.errors import FedmiraError

OVERRIDES_HELP = ("Hydra overrides (key=value, group=option, +debug=tiny); the coordinator's define the run, "
                  "a hospital's only what its preflight checks (model, lora, data format)")


def cmd_coordinator(args: argparse.Namespace) -> int:
    from simulations.deploy import coordinator_command

    return coordinator_command(args.overrides, certs=args.certs, allow_list=args.allow_list,
                               wait_sites=args.wait_sites, verbose=args.verbose)


def cmd_hospital(args: argparse.Namespace) -> int:
    from simulations.hospital import hospital_command

    return hospital_command(args.overrides, superlink=args.superlink, root_cert=args.root_cert, key=args.key,
                            data=args.data, site_id=args.site_id, workdir=args.workdir,
                            isolation=args.isolation, site_index=args.site_index,
                            node_config=args.node_config or (), dry_run=not args.no_dry_run,
                            preflight_only=args.preflight_only)


def cmd_certs(args: argparse.Namespace) -> int:
    from simulations.certs import certs_command

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
                    "with the hospitals' keys from --allow-list, state database shared by the coordinator's runs, mode.state_db), wait "
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.deploy_cli COMMAND ...``: the same as ``fedmira COMMAND ...``."""
    from common.cli import main as fedmira_main

    return fedmira_main(argv)


if __name__ == "__main__":
    sys.exit(main())
