"""``fedmira hospital``: preflight checks, then this hospital's Flower SuperNode.

Preflight, in the order a hospital's IT needs the answers:

1. data: the reports are checked with ``common.reports.check_data`` (a folder with
   ``train.jsonl``/``val.jsonl``, or one report file that is split into train/val/test into
   ``WORKDIR/data/<site-id>``, deterministically);
2. device: CUDA, Apple MPS or CPU, with free memory;
3. base model: found locally (never downloaded), with its size, and the GPU memory training
   will need (``common.memory``): on CUDA, preflight fails here if it does not fit;
4. what leaves the hospital: one dry-run round on a few local reports shows the adapter tensors
   (count, bytes per round) and the names of the metrics sent; report text never leaves;
5. credentials: the root certificate and the node key are readable and of the right type;
6. the coordinator: reachable, and its certificate verifies against the root certificate.

Then it starts ``flower-supernode`` with TLS, the node's authentication key, the node config
(``data-path``, ``site-id``, ``site-index``), telemetry and runtime dependency installation off.
With ``--isolation warm`` (the default) the SuperNode runs in ``--isolation process`` and this
process executes the ClientApp tasks itself (``client/warm_executor.py``), so the base model
stays loaded between rounds; ``--isolation subprocess`` is Flower's default (one fresh process per
task). The SuperNode's log, with timestamps, is ``WORKDIR/supernode.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import DataError, FedmiraError
from fedmira.common.flower_runtime import (
    flower_env,
    free_port,
    kill_marked,
    parse_address,
    start_reaper,
    stop_group,
)
from fedmira.common.secagg import STAGE_MESSAGE_TYPE
from fedmira.common.site import QUERY_SITE

ISOLATIONS = ("warm", "subprocess")
CONNECT_TIMEOUT_S = 10.0
DRY_RUN_REPORTS = 2


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Hospital:
    """Everything ``fedmira hospital`` needs, resolved to absolute paths."""

    superlink: str
    root_cert: Path
    key: Path
    data: Path
    site_id: str
    workdir: Path
    isolation: str = "warm"
    site_index: int | None = None
    node_config: dict[str, str] = field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        """Return the SuperLink address as (host, port)."""
        return parse_address(self.superlink)

    @property
    def index(self) -> int:
        """``site_index``, else a stable number from the site id (seeds differ between sites)."""
        if self.site_index is not None:
            return self.site_index
        return int(hashlib.sha256(self.site_id.encode()).hexdigest()[:6], 16) % 10_000


# ------------------------------------------------------------------------------ 1. data
def prepare_data(h: Hospital, cfg: ExperimentConfig, out: TextIO) -> Path:
    """Check the reports; returns the folder with ``train.jsonl``/``val.jsonl`` to train on."""
    from fedmira.common.reports import check_data

    if h.data.is_dir():
        files = [h.data / "train.jsonl", *[p for p in [h.data / "val.jsonl"] if p.is_file()]]
        if not files[0].is_file():
            raise DataError(f"{h.data} has no train.jsonl; give a folder with train.jsonl and val.jsonl "
                            "(as `fedmira partition` writes) or one report file (.jsonl/.csv).")
        for path in files:
            print(f"== {path}", file=out)
            if check_data(path, fmt="jsonl", policy=cfg.data.policy, max_chars=cfg.data.max_chars,
                          out=out) != 0:
                raise DataError(f"{path} holds no usable reports; fix the problems listed above.")
        return h.data
    if not h.data.is_file():
        raise DataError(f"--data {h.data} does not exist; give the folder or file of this hospital's "
                        "reports.")
    print(f"== {h.data}", file=out)
    if check_data(h.data, fmt=cfg.data.format, policy=cfg.data.policy, max_chars=cfg.data.max_chars,
                  out=out) != 0:
        raise DataError(f"{h.data} holds no usable reports; fix the problems listed above.")
    return split_file(h, cfg, out)


def split_file(h: Hospital, cfg: ExperimentConfig, out: TextIO) -> Path:
    """Split one report file into ``WORKDIR/data/<site-id>/{train,val,test}.jsonl`` (by hash)."""
    from fedmira.common.partition import partition_reports, write_site_folders
    from fedmira.common.reports import load_reports

    result = load_reports(h.data, fmt=cfg.data.format, policy=cfg.data.policy, max_chars=cfg.data.max_chars,
                          site_id=h.site_id)
    reports = [dataclasses.replace(r, site_id=h.site_id) for r in result.reports]
    p = cfg.partition
    (split,) = partition_reports(reports, method="natural", val_fraction=p.val_fraction,
                                 test_fraction=p.test_fraction, seed=p.seed)
    (folder,) = write_site_folders([split], h.workdir / "data")
    print(f"Split into {folder}: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test "
          f"(partition.seed={p.seed}; the same file gives the same split).", file=out)
    return folder


# ------------------------------------------------------------------------------ 2./3. device, model
def device_summary(cfg: ExperimentConfig) -> tuple[str, int | None]:
    """Return (description, free bytes or None) of the device the model will use."""
    import torch

    from fedmira.common.model import resolve_device

    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return f"CUDA {name}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free", free
    free_ram = _free_ram()
    ram = (f"{free_ram / 2**30:.1f} GiB RAM free" if free_ram is not None
           else "free RAM unknown (install psutil)")
    if device.type == "mps":
        return f"Apple MPS (unified memory), {ram}", free_ram
    return f"CPU ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads), {ram}", free_ram


def _free_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def load_model(cfg: ExperimentConfig, out: TextIO, keep: bool) -> Any:
    """Load the configured base model with LoRA; ``keep``: into the ClientApp's process cache.

    With ``keep`` (warm isolation, where this process runs the rounds) the first round starts
    with the model loaded; otherwise the model is dropped after the preflight, since Flower's
    per-task processes load their own copy.
    """
    from fedmira.common.model import count_trainable
    from fedmira.common.site import ModelCache

    cache = ModelCache()
    if keep:
        try:
            from fedmira.client.client_app import _MODELS as cache  # the ClientApp's process-wide cache
        except ImportError:
            pass
    worker, _ = cache.get(cfg.model, cfg.lora, seed=cfg.train.seed)
    size = sum(p.numel() * p.element_size() for p in worker.loaded.model.parameters())
    print(f"Base model {cfg.model.name_or_path} ({worker.loaded.source}): {size / 2**20:.0f} MiB in "
          f"{worker.loaded.dtype}, loaded in {worker.initial_load_s:.1f} s on {worker.loaded.device}; "
          f"{count_trainable(worker.model):,} trainable LoRA parameters.", file=out)
    return worker


def check_memory(worker: Any, cfg: ExperimentConfig, out: TextIO) -> None:
    """Print the GPU memory training needs (``common.memory``); on CUDA, fail now if it does not fit.

    On the CPU or Apple MPS the GPU estimate is information for sizing a GPU server, beside what
    training here would hold in RAM.
    """
    import torch

    from fedmira.common.memory import GIB, estimate_for_config

    loaded = worker.loaded
    device = loaded.device
    try:
        estimate = estimate_for_config(cfg, loaded.model.config)
        here = estimate if device.type == "cuda" else estimate_for_config(cfg, loaded.model.config,
                                                                         device_type="cpu")
    except (ValueError, AttributeError, TypeError) as exc:
        print(f"  GPU memory estimate skipped: {exc}", file=out)
        return
    details = "\n".join("    " + line for line in estimate.describe().splitlines())
    if device.type != "cuda":
        free_ram = _free_ram()
        ram = f"{free_ram / GIB:.1f} GiB RAM free" if free_ram is not None else "free RAM unknown"
        print(f"  GPU memory this would need: about {estimate.total / GIB:.1f} GiB on a CUDA GPU "
              f"(estimate):\n{details}\n  Here on {device.type}: training's tensors peak at about "
              f"{here.peak_allocated / GIB:.1f} GiB ({ram}); information only.", file=out)
        return
    free, _ = torch.cuda.mem_get_info(device)
    resident = int(torch.cuda.memory_allocated(device))
    room = estimate.headroom(free, resident_bytes=resident, context_created=True)
    print(f"  GPU memory for training: about {estimate.total / GIB:.1f} GiB (estimate; "
          f"{resident / GIB:.1f} GiB of it already loaded, {free / GIB:.1f} GiB free):\n{details}", file=out)
    if room < 0:
        raise FedmiraError(
            f"Training needs about {estimate.total / GIB:.1f} GiB of GPU memory (estimate above) but "
            f"{torch.cuda.get_device_name(device)} has {free / GIB:.1f} GiB free besides the "
            f"{resident / GIB:.1f} GiB already loaded ({-room / GIB:.1f} GiB short). Lower it with "
            f"{_memory_fixes(cfg, loaded.model.config)}.")


def _memory_fixes(cfg: ExperimentConfig, hf_config: Any) -> str:
    """List the settings that lower the estimate, each with what it would come to."""
    from fedmira.common.memory import GIB, estimate_for_config

    m, t, d = cfg.model, cfg.train, cfg.data
    half, short = max(1, t.batch_size // 2), max(64, d.max_length // 2)
    options: list[tuple[str, dict[str, Any]]] = []
    if m.quantization != "nf4":
        options.append(("model.quantization=nf4", {"model": {"quantization": "nf4"}}))
    if t.batch_size > 1:
        options.append((f"train.batch_size={half} (train.grad_accum={2 * t.grad_accum} keeps the step)",
                        {"train": {"batch_size": half, "grad_accum": 2 * t.grad_accum}}))
    if d.max_length > 64:
        target = min(d.max_target_tokens, short - 8)
        shorter = {"max_length": short, "max_target_tokens": target}
        options.append((f"data.max_length={short}", {"data": shorter}))
    if not t.gradient_checkpointing and not cfg.privacy.enabled:
        options.append(("train.gradient_checkpointing=true", {"train": {"gradient_checkpointing": True}}))
    parts = []
    for name, change in options:
        try:
            sections = {sec: dataclasses.replace(getattr(cfg, sec), **kw) for sec, kw in change.items()}
            changed = cfg.replace(**sections)
            parts.append(f"{name} (about {estimate_for_config(changed, hf_config).total / GIB:.1f} GiB)")
        except (FedmiraError, ValueError, AttributeError, TypeError):  # e.g. nf4 refused for a .gguf model
            continue
    return ", ".join(parts) if parts else "a smaller base model (model.name_or_path)"


# ------------------------------------------------------------------------------ 4. what leaves
def dry_run(worker: Any, folder: Path, cfg: ExperimentConfig, h: Hospital, out: TextIO) -> None:
    """One local round on a few reports: print exactly what a reply to the coordinator holds."""
    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.site import load_site, local_evaluate, local_train, round_flags
    from fedmira.common.transport import state_payload_bytes

    site = load_site(folder, h.site_id)
    small = dataclasses.replace(site, train=site.train[:DRY_RUN_REPORTS], val=site.val[:DRY_RUN_REPORTS])
    quick = cfg.replace(eval=dataclasses.replace(cfg.eval, max_loss_samples=DRY_RUN_REPORTS, rouge_samples=1,
                                                 max_new_tokens=4))
    start = get_adapter_state(worker.model)
    freeze_a = round_flags(cfg.strategy.name).get("freeze-lora-a", False)  # as a round's message says
    state, train_metrics = local_train(worker, small, quick, start, lr=cfg.train.lr, steps=1, seed=0,
                                       freeze_a=freeze_a)
    eval_metrics = local_evaluate(worker, small, quick, start) if small.val else {}
    sent = state_payload_bytes(state, cfg.strategy.transport_dtype)
    extra = ["setup-s", "cold-start", "site-index"]  # added by client/client_app.py
    print(f"What leaves this hospital per round (dry run on {DRY_RUN_REPORTS} local reports):\n"
          f"  adapter: {len(state)} LoRA tensors, {sent:,} bytes ({sent / 1e6:.2f} MB at "
          f"strategy.transport_dtype={cfg.strategy.transport_dtype}); the base model never leaves\n"
          f"  train metrics (numbers): {', '.join(sorted([*train_metrics, *extra]))}\n"
          f"  evaluate metrics (numbers): {', '.join(sorted([*eval_metrics, *extra])) or '(no val.jsonl)'}\n"
          f"  site id: {h.site_id!r}\n"
          f"  never: report text, findings, impressions, report or patient ids", file=out)


# ------------------------------------------------------------------------------ 5./6. credentials, link
def check_credentials(h: Hospital, out: TextIO) -> None:
    """Check the root certificate is PEM and the key an EC key in OpenSSH format (as Flower reads them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path, what in ((h.root_cert, "--root-cert (the coordinator's ca.crt)"),
                       (h.key, "--key (this hospital's supernode_key)")):
        if not path.is_file():
            raise FedmiraError(f"{what} {path} not found.")
    try:
        x509.load_pem_x509_certificates(h.root_cert.read_bytes())
    except ValueError as exc:
        raise FedmiraError(f"{h.root_cert} is not a PEM certificate ({exc}); use the ca.crt the "
                           "coordinator sent.") from exc
    try:
        key = serialization.load_ssh_private_key(h.key.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise FedmiraError(f"{h.key} is not an unencrypted OpenSSH private key ({exc}); make one "
                           "with `ssh-keygen -t ecdsa -b 384 -N \"\" -f supernode_key` or "
                           "`fedmira certs`.") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedmiraError(f"{h.key} is not an ECDSA key; Flower's node authentication needs ECDSA "
                           "(`ssh-keygen -t ecdsa -b 384`).")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(public).hexdigest()[:16]
    print(f"Node key {h.key} (ECDSA {key.curve.name}, fingerprint sha256:{digest}); its public key "
          f"({h.key}.pub) must be on the coordinator's allow-list.", file=out)


def check_connection(h: Hospital, out: TextIO, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Open a TLS connection to the SuperLink and verify its certificate with the root cert."""
    host, port = h.host_port
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise FedmiraError(f"Cannot resolve {host!r} ({exc}); check --superlink HOST:PORT.") from exc
    except ConnectionRefusedError as exc:
        raise FedmiraError(f"Nothing listens on {host}:{port}: is `fedmira coordinator` running, and is the "
                           "port right (--superlink)?") from exc
    except OSError as exc:
        raise FedmiraError(f"No answer from {host}:{port} within {timeout:.0f} s ({exc}); check --superlink, "
                           "the hospital's firewall/proxy rules and the coordinator's.") from exc
    context = ssl.create_default_context(cafile=str(h.root_cert))
    try:
        with sock, context.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message):
            raise FedmiraError(f"The SuperLink's certificate is not valid for {host!r} "
                               f"({exc.verify_message}); connect with the name or address the "
                               "certificate was made for, or ask the coordinator for a certificate "
                               "with that SAN.") from exc
        raise FedmiraError(f"The SuperLink's certificate does not verify against {h.root_cert} "
                           f"({exc.verify_message}); ask the coordinator for its CA certificate "
                           "(ca.crt).") from exc
    except (ssl.SSLError, OSError) as exc:
        raise FedmiraError(f"TLS handshake with {host}:{port} failed ({exc}); is it a fedmira SuperLink with "
                           "TLS on this port?") from exc
    print(f"Coordinator {host}:{port} reachable; its certificate verifies ({version}).", file=out)


# ------------------------------------------------------------------------------ SuperNode
def supernode_command(h: Hospital, folder: Path, runtime_port: int) -> list[str]:
    """Return the ``flower-supernode`` command line for this hospital."""
    config = {"data-path": str(folder), "site-id": h.site_id, "site-index": h.index, **h.node_config}
    node_config = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
    return [
        "flower-supernode", "--superlink", h.superlink, "--root-certificates", str(h.root_cert),
        "--auth-supernode-private-key", str(h.key), "--node-config", node_config,
        "--isolation", "process" if h.isolation == "warm" else "subprocess",
        "--host", "127.0.0.1", "--port", str(runtime_port),
    ]


def _stamp() -> str:
    """Local time with milliseconds, as the SuperNode log's line prefix."""
    now = time.time()
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"


def _toml(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# What Flower prints when it gives up, and what to tell the hospital.
FAILURES = (
    ("Failed to activate SuperNode",
     ("The coordinator refused this hospital's key (Flower: \"{line}\"): {key}.pub is not on its "
      "allow-list. Send that file to the coordinator; they add its line to the allow-list and restart "
      "`fedmira coordinator` (it registers new keys at start).")),
    ("CERTIFICATE_VERIFY_FAILED",
     ("The SuperLink's certificate does not verify against {root} (Flower: \"{line}\"); ask the "
      "coordinator for its ca.crt.")),
    ("Unable to parse the private key",
     ("Flower cannot read {key} (\"{line}\"); use the OpenSSH key from `fedmira certs` or "
      "`ssh-keygen -t ecdsa -b 384`.")),
    ("401 Unauthorized",
     ("The coordinator's SuperLink no longer accepts this hospital's node (Flower: \"{line}\"): it was "
      "restarted with another state database (mode.state_db) or {key}.pub left its allow-list. Start "
      "`fedmira hospital` again once the coordinator runs with this key on its allow-list.")),
    ("Address already in use",
     ("The local Runtime API port is in use (\"{line}\"); another SuperNode runs on this machine "
      "with the same port.")),
)


class SuperNodeProcess:
    """``flower-supernode`` as a child: log with timestamps, progress lines, failure diagnosis."""

    def __init__(self, h: Hospital, folder: Path, out: TextIO) -> None:
        self.h, self.out = h, out
        self.runtime_port = free_port()
        self.cmd = supernode_command(h, folder, self.runtime_port)
        self.env = flower_env(h.workdir / ".flwr", run_dir=h.workdir)
        self.log_path = h.workdir / "supernode.log"
        self.node_id: str | None = None
        self.failure: str | None = None
        self.lost = False
        self.connected = threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        self.reaper: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start the SuperNode in its own session, with a reaper and a thread that reads its log."""
        (self.h.workdir / ".flwr").mkdir(parents=True, exist_ok=True)
        kill_marked(self.h.workdir)  # a previous, killed `fedmira hospital` of this workdir
        # Its own session (stop() signals the group). No preexec_fn: this process already runs
        # threads (torch); the reaper ends the SuperNode's processes if this one dies.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                     bufsize=1, start_new_session=True)
        self.reaper = start_reaper(self.h.workdir)
        self._reader = threading.Thread(target=self._read, name="supernode-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                line = re.sub(r"\x1b\[[0-9;]*m", "", raw.rstrip("\n"))
                log.write(f"{_stamp()} {line}\n")
                log.flush()
                self._interpret(line)
        self.connected.set()  # wake waiters: the process ended

    def _interpret(self, line: str) -> None:
        if m := re.search(r"SuperNode ID: (\d+)", line):
            self.node_id = m.group(1)
            self.connected.set()
        elif m := re.search(r"Receiving: ([\w.]+) message", line):
            kind = m.group(1) + {STAGE_MESSAGE_TYPE: " (SecAgg+ key or unmask stage)",
                                 QUERY_SITE: " (the coordinator asks this site's id, to sample by site)"
                                 }.get(m.group(1), "")
            print(f"{time.strftime('%H:%M:%S')} task received: {kind}", file=self.out, flush=True)
        for needle, text in FAILURES:
            if needle in line and self.failure is None:
                self.failure = text.format(line=line.strip(), key=self.h.key, root=self.h.root_cert)
                self.connected.set()  # no point waiting: Flower gave up
        if "Connection attempt failed" in line and self.node_id and not self.lost:
            self.lost = True
            print(f"{time.strftime('%H:%M:%S')} lost the coordinator; retrying (rounds resume when it "
                  "is back)", file=self.out, flush=True)
        elif "Connection successful after" in line and self.lost:
            self.lost = False
            print(f"{time.strftime('%H:%M:%S')} reconnected to the coordinator", file=self.out, flush=True)

    def wait_connected(self, timeout: float = 120.0) -> str:
        """Block until the SuperLink accepted this node; raise with a diagnosis if it did not."""
        self.connected.wait(timeout)
        if self.failure is not None:
            raise FedmiraError(self.failure)
        if self.node_id is not None and self.alive():
            return self.node_id
        if self.proc is not None and (self._reader is None or not self._reader.is_alive()):
            try:
                self.proc.wait(10)  # its output ended: it is exiting
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            raise FedmiraError(f"The SuperNode did not connect within {timeout:.0f} s; see {self.log_path}.")
        raise FedmiraError(f"The SuperNode exited (code {self.proc.returncode if self.proc else '?'}); "
                           f"see {self.log_path}.")

    def alive(self) -> bool:
        """Return whether the SuperNode process is running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the SuperNode's process group (SIGTERM first), marked leftovers and the reaper."""
        if self.alive():
            assert self.proc is not None
            stop_group(self.proc.pid, grace=10.0)  # SIGTERM first: Flower deactivates the node
        kill_marked(self.h.workdir)
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper = None


# ------------------------------------------------------------------------------ run
def preflight(h: Hospital, cfg: ExperimentConfig, out: TextIO, dry: bool = True) -> Path:
    """Run steps 1-6 of the module docstring; return the data folder the SuperNode will use."""
    print("[1/6] data", file=out)
    folder = prepare_data(h, cfg, out)
    print(f"[2/6] device: {device_summary(cfg)[0]}", file=out)
    print("[3/6] base model", file=out)
    worker = load_model(cfg, out, keep=h.isolation == "warm")
    check_memory(worker, cfg, out)
    print("[4/6] what leaves the hospital", file=out)
    if dry:
        dry_run(worker, folder, cfg, h, out)
    else:
        print("  (skipped: --no-dry-run)", file=out)
    del worker
    print("[5/6] credentials", file=out)
    check_credentials(h, out)
    print("[6/6] coordinator", file=out)
    check_connection(h, out)
    return folder


def serve_warm(node: SuperNodeProcess, stop: threading.Event, out: TextIO) -> None:
    """Run the ClientApp tasks in this process until ``stop`` or the SuperNode ends."""
    from fedmira.client.warm_executor import TaskTiming, serve

    def report(t: TaskTiming) -> None:
        stamp = time.strftime("%H:%M:%S")
        if t.ok:
            print(f"{stamp} {t.kind} done: input {t.pulled - t.acquired:.2f} s, ClientApp "
                  f"{t.app_ended - t.app_started:.2f} s", file=out, flush=True)
        else:
            print(f"{stamp} {t.kind or 'task'} FAILED (an error reply was sent if possible; see the "
                  "log above)", file=out, flush=True)

    def watch() -> None:
        while not stop.is_set() and node.alive():
            time.sleep(0.5)
        stop.set()

    threading.Thread(target=watch, name="supernode-watch", daemon=True).start()
    serve(f"127.0.0.1:{node.runtime_port}", stop, on_task=report)


def run_hospital(h: Hospital, cfg: ExperimentConfig, *, out: TextIO = sys.stdout, dry: bool = True,
                 preflight_only: bool = False) -> int:
    """Preflight, then run the SuperNode until interrupted; returns the exit code."""
    h.workdir.mkdir(parents=True, exist_ok=True)
    folder = preflight(h, cfg, out, dry)
    if preflight_only:
        print("Preflight passed.", file=out)
        return 0
    node = SuperNodeProcess(h, folder, out)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: (stop.set(), _raise_interrupt()))
    try:
        node.start()
        node_id = node.wait_connected()
        print(f"Connected to {h.superlink} as SuperNode {node_id} ({h.isolation} isolation); waiting for "
              f"rounds. Log: {node.log_path}. Stop with Ctrl-C.", file=out, flush=True)
        if h.isolation == "warm":
            serve_warm(node, stop, out)
        else:
            while node.alive():
                time.sleep(1.0)
        if not node.alive():
            raise FedmiraError(node.failure or stopped_text(node))
    except KeyboardInterrupt:
        print("Stopping the SuperNode.", file=out)
    finally:
        stop.set()
        node.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def stopped_text(node: SuperNodeProcess) -> str:
    """Explain why a SuperNode that nobody stopped ended.

    Flower ends a connected SuperNode by itself (SIGINT to itself) when the SuperLink answers its
    heartbeat 401: the node id is unknown there.
    """
    code = node.proc.returncode if node.proc is not None else None
    if node.node_id is None:
        return f"The SuperNode stopped before it connected (exit code {code}); see {node.log_path}."
    if code not in (0, None):
        return f"The SuperNode {node.node_id} exited with code {code}; see {node.log_path}."
    return (f"The SuperNode {node.node_id} stopped by itself: the coordinator's SuperLink no longer "
            "knows this node (Flower stops a SuperNode whose heartbeat is refused, HTTP 401). The "
            "coordinator was restarted with another state database (mode.state_db) or this key left "
            "its allow-list; start `fedmira hospital` again once the coordinator is back. Details: "
            f"{node.log_path}.")


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def hospital_command(
    overrides: Sequence[str], *, superlink: str | None, root_cert: str, key: str, data: str,
    site_id: str | None = None, workdir: str | None = None, isolation: str = "warm",
    site_index: int | None = None, node_config: Sequence[str] = (), dry_run: bool = True,
    preflight_only: bool = False,
) -> int:
    """``fedmira hospital --superlink HOST:PORT --root-cert CA --key KEY --data PATH [...]``."""
    from fedmira.common.compose import compose_config

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    if isolation not in ISOLATIONS:
        raise FedmiraError(f"--isolation {isolation!r}: use one of {', '.join(ISOLATIONS)}.")
    cfg = compose_config(list(overrides))
    address = superlink or cfg.mode.superlink
    if not address:
        raise FedmiraError("Give the coordinator's address: --superlink HOST:PORT.")
    data_path = Path(data).expanduser().resolve()
    name = site_id or (data_path.name if data_path.is_dir() else data_path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise FedmiraError(f"Site id {name!r} may hold letters, digits, '.', '-' and '_' only; "
                           "set --site-id.")
    extra = dict(kv.split("=", 1) for kv in node_config)
    h = Hospital(superlink=address, root_cert=Path(root_cert).expanduser().resolve(),
                 key=Path(key).expanduser().resolve(), data=data_path, site_id=name,
                 workdir=Path(workdir or f"fedmira-{name}").expanduser().resolve(),
                 isolation=isolation, site_index=site_index, node_config=extra)
    h.host_port  # noqa: B018  (validates the address before anything slow)
    return run_hospital(h, cfg, dry=dry_run, preflight_only=preflight_only)
