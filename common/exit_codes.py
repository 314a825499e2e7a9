"""Exit codes of ``fedmira simulate`` and ``fedmira coordinator``: one per kind of failure.

A scheduler or a wrapper script can so tell "try again later" from "fix the config".

The ServerApp records why a run failed in ``RUN_DIR/state.json`` (``failure: {kind, reason}``);
the launcher prints the reason in one line and exits with the kind's code.
"""

from __future__ import annotations

OK = 0
#: The run failed for another reason (a bug, a crash in the ServerApp); resumable; see flower.log.
FAILED = 1
#: Refused before anything ran: bad config or input, the run folder's lock held, a busy port.
USAGE = 2
#: A round had fewer usable replies than ``strategy.min_train_sites`` (sites offline, timed
#: out, excluded); resumable once enough sites are back.
TOO_FEW_SITES = 3
#: Flower's SuperLink or ``flwr run`` ended before the run finished, or never started it.
FLOWER = 4
#: Interrupted (Ctrl-C / SIGINT).
INTERRUPTED = 130

#: ``state.json`` failure kind -> exit code.
FAILURE_CODES = {"too_few_sites": TOO_FEW_SITES, "serverapp_error": FAILED, "flower": FLOWER}

#: The table ``--help`` and the docs print.
TABLE = ("exit codes: 0 all rounds committed (or stopped by the byte budget); 1 the run failed "
         "(reason printed; resumable); 2 refused before start (config, input, lock, port); 3 too "
         "few sites in a round (strategy.min_train_sites; resumable); 4 Flower's SuperLink or "
         "`flwr run` ended early; 130 interrupted")


def exit_code(kind: str | None) -> int:
    """Return the exit code of a recorded failure kind (unknown kinds: :data:`FAILED`)."""
    return FAILURE_CODES.get(kind or "", FAILED)
