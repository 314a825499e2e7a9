"""A run folder: resolved config, per-round metrics, adapters after every round, resume state.

Layout::

    RUN_DIR/
      config.json            resolved ExperimentConfig + its hash and the locked part's hash
      run_config.toml        the flat Flower run config the apps received
      sites/                 one folder per simulated hospital + manifest.json + summary.csv
      rounds/round_0003/     the global adapter after round 3 (PEFT format), plus
                             strategy_state.safetensors for stateful strategies (FedAdam's m, v, t)
      final_adapter/         the last round's adapter (PEFT format)
      metrics.jsonl          one JSON object per completed round (aggregate + per site)
      metrics.csv            the same, flattened, for spreadsheets
      state.json             {"last_round": 3, ...}: what resume reads
      loss.png               train/validation loss per round, overall and per site
      run.lock               held (an OS file lock) by the one launcher driving the run

A round is *committed* in this order: adapter folder written under a temporary name and renamed,
then the metrics line appended, then ``state.json`` replaced atomically. A crash at any point
leaves either the previous committed round or the new one; on resume, metric lines of rounds
after ``last_round`` are dropped, so no round appears twice and none is lost.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from fedmira.common.errors import FedmiraError

STATE_FILE = "state.json"
ALLOWED_NODES = "allowed_nodes.json"  # deployment: node ids of the allow-listed keys
LOCK_FILE = "run.lock"  # held by the launcher driving the run
STRATEGY_STATE = "strategy_state.safetensors"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"


class RunLock:
    """An OS lock (``flock``) on ``RUN_DIR/run.lock`` for the life of one launcher.

    A second launcher of the same run folder (a resume typed twice, a simulate beside a
    coordinator) is refused before it touches anything, with the holder's pid, command and start
    time. The kernel releases the lock when the holder dies, even by SIGKILL, so a crashed run
    is never locked out; the file descriptor is not inherited by the Flower processes started.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; a :class:`FedmiraError` naming the holder if it is taken."""
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FedmiraError(
                f"{self.path.parent} is in use by `fedmira {holder.get('command', '?')}` (pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')}); nothing was changed. "
                "Stop that process first (or wait for it to finish), then run this again.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": self.command,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (nothing if it is not held)."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return dict(json.loads(os.read(fd, 4096).decode() or "{}"))
    except (OSError, ValueError):
        return {}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Reads and writes one run folder (see the module docstring for the layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ config
    def write_config(self, config: Mapping[str, Any], config_hash: str, lock_hash: str) -> None:
        """Write ``config.json`` (the config and its hashes) atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        doc = {"config": dict(config), "config_hash": config_hash, "lock_hash": lock_hash}
        _atomic_write(self.path / CONFIG_JSON, json.dumps(doc, indent=2, sort_keys=True))

    def read_config(self) -> dict[str, Any]:
        """Read ``config.json``; a :class:`FedmiraError` when this is not a run folder."""
        path = self.path / CONFIG_JSON
        if not path.is_file():
            raise FedmiraError(f"{self.path} is not a fedmira run folder ({CONFIG_JSON} missing).")
        return dict(json.loads(path.read_text()))

    # ------------------------------------------------------------------ allow-list
    def write_allowed_nodes(self, nodes: Mapping[str, int]) -> None:
        """Deployment: hospital name -> SuperLink node id of every allow-listed key."""
        _atomic_write(self.path / ALLOWED_NODES, json.dumps({"nodes": dict(nodes)}, indent=2, sort_keys=True))

    def allowed_nodes(self) -> frozenset[int]:
        """Read the node ids the coordinator allow-listed; an error when it wrote none."""
        path = self.path / ALLOWED_NODES
        if not path.is_file():
            raise FedmiraError(f"{path} is missing: a deployment's ServerApp takes only the nodes "
                               "`fedmira coordinator` allow-listed; start deployments with it.")
        return frozenset(int(n) for n in json.loads(path.read_text())["nodes"].values())

    def allowed_node_names(self) -> dict[int, str]:
        """Node id -> hospital name of the allow-list (empty when the coordinator wrote none)."""
        path = self.path / ALLOWED_NODES
        if not path.is_file():
            return {}
        return {int(n): str(name) for name, n in json.loads(path.read_text())["nodes"].items()}

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Read ``state.json`` (``{"last_round": 0}`` before the first round)."""
        path = self.path / STATE_FILE
        return dict(json.loads(path.read_text())) if path.is_file() else {"last_round": 0}

    @property
    def last_round(self) -> int:
        """The last committed round (0 before the first)."""
        return int(self.state().get("last_round", 0))

    def round_dir(self, server_round: int) -> Path:
        """Return the folder of round ``server_round``."""
        return self.path / "rounds" / f"round_{server_round:04d}"

    def commit_round(
        self, server_round: int, write_adapter: Any, metrics: Mapping[str, Any],
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit a finished round: adapter (via ``write_adapter(folder)``), metrics, state."""
        final = self.round_dir(server_round)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._drop_metrics_after(server_round - 1)
        with open(self.path / METRICS_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": server_round, **metrics}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        state = {**self.state(), **(extra_state or {}), "last_round": server_round}
        _atomic_write(self.path / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))

    def comm_totals(self) -> tuple[int, int]:
        """Cumulative adapter bytes (up, down) of the committed rounds (from the last metrics line)."""
        rows = self.metrics()
        comm = rows[-1].get("comm", {}) if rows else {}
        return int(comm.get("cumulative_up_bytes", 0)), int(comm.get("cumulative_down_bytes", 0))

    def mark(self, **fields: Any) -> None:
        """Merge ``fields`` into state.json (e.g. status, timings)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / STATE_FILE,
                      json.dumps({**self.state(), **fields}, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> list[dict[str, Any]]:
        """Read the rows of ``metrics.jsonl``, one per committed round, in order (a cut line is skipped)."""
        path = self.path / METRICS_JSONL
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: it was never committed
                    continue
        return rows

    def _drop_metrics_after(self, server_round: int) -> None:
        """Keep only committed rounds <= ``server_round`` (a crash may leave an extra line)."""
        rows = [r for r in self.metrics() if int(r["round"]) <= server_round]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        _atomic_write(self.path / METRICS_JSONL, text)

    def repair(self) -> int:
        """Make metrics agree with state.json before a resume; returns the last committed round."""
        last = self.last_round
        self._drop_metrics_after(last)
        for tmp in (self.path / "rounds").glob("*.tmp") if (self.path / "rounds").is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
        return last

    def write_metrics_csv(self) -> Path:
        """Flatten metrics.jsonl into metrics.csv (one row per round and site, plus 'all')."""
        rows: list[dict[str, Any]] = []
        for rec in self.metrics():
            base = {"round": rec["round"]}
            comm = rec.get("comm", {})
            rows.append({**base, "site": "all", **_scalars(rec.get("train", {}), "train_"),
                         **_scalars(rec.get("evaluate", {}), "eval_"), **_scalars(comm, "comm_")})
            sites = set(rec.get("train_sites", {})) | set(rec.get("evaluate_sites", {}))
            for site in sorted(sites | set(comm.get("sites", {}))):
                rows.append({**base, "site": site,
                             **_scalars(rec.get("train_sites", {}).get(site, {}), "train_"),
                             **_scalars(rec.get("evaluate_sites", {}).get(site, {}), "eval_"),
                             **_scalars(comm.get("sites", {}).get(site, {}), "comm_")})
        columns = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("round", "site"), c))
        path = self.path / METRICS_CSV
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path


def save_strategy_state(folder: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """Write a strategy's server state (NumPy arrays + string metadata) into a round folder.

    Called from ``commit_round``'s ``write_adapter`` callback, so it is committed atomically
    with the round's adapter.
    """
    from safetensors.numpy import save_file

    path = Path(folder) / STRATEGY_STATE
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    return path


def load_strategy_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """Load the (tensors, metadata) saved by :func:`save_strategy_state`, or None when absent."""
    from safetensors import safe_open

    path = Path(folder) / STRATEGY_STATE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _scalars(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in d.items() if isinstance(v, (int, float, str))}


def plot_losses(run: RunDir, path: Path | None = None) -> Path | None:
    """Train and validation loss per round, overall (thick) and per site (thin)."""
    rows = run.metrics()
    if not rows:
        return None
    os.environ.setdefault("MPLCONFIGDIR", str(run.path / ".mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, sites_key, title in (
        (axes[0], ("train", "train-loss"), "train_sites", "Local training loss"),
        (axes[1], ("evaluate", "val-loss"), "evaluate_sites", "Validation loss (global adapter)"),
    ):
        per_site: dict[str, list[tuple[int, float]]] = {}
        for rec in rows:
            for site, m in rec.get(sites_key, {}).items():
                if key[1] in m:
                    per_site.setdefault(site, []).append((rec["round"], m[key[1]]))
        for _site, pts in sorted(per_site.items()):
            ax.plot(*zip(*pts), lw=0.8, alpha=0.5, marker=".", label=None)
        overall = [(r["round"], r[key[0]][key[1]]) for r in rows if key[1] in r.get(key[0], {})]
        if overall:
            ax.plot(*zip(*overall), lw=2.5, color="black", marker="o", label="all sites (weighted)")
            ax.legend(loc="upper right")
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("loss per target token")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.path.name}: thin lines = individual sites")
    fig.tight_layout()
    out = path or run.path / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_tensorboard(run: RunDir, record: Mapping[str, Any]) -> None:
    """Append one committed round's scalars to TensorBoard event files in ``RUN_DIR/tb``."""
    from torch.utils.tensorboard import SummaryWriter

    g = int(record["round"])
    with SummaryWriter(str(run.path / "tb")) as writer:
        for kind in ("train", "evaluate"):
            for key, value in record.get(kind, {}).items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{kind}/{key}", value, g)
            for site, metrics in record.get(f"{kind}_sites", {}).items():
                for key in ("train-loss", "val-loss", "rouge-l"):
                    if key in metrics:
                        writer.add_scalar(f"{kind}_sites/{key}/{site}", metrics[key], g)


def excluded_count(rejected: list[dict[str, Any]]) -> int:
    """Count the sites excluded in a round: distinct nodes.

    A site refused twice in one round (e.g. its training timed out and its evaluation failed)
    counts once; records from before node ids were kept count by site name.
    """
    return len({r.get("node", r.get("site")) for r in rejected})
