"""A long-lived ClientApp executor for a deployed hospital: the base model stays loaded.

Flower 1.42 runs every ClientApp task (each round's ``train`` and ``evaluate`` message) as a
fresh ``flwr-clientapp`` process: with the default ``--isolation subprocess`` the SuperNode's
SuperExec spawns it; with ``--isolation process`` a separately started ``flower-superexec``
spawns it. Either way ``flwr-clientapp`` takes one token, runs one task and exits (it has no
loop; Flower's warm executor pools exist only for Kubernetes and not for ClientApps). So every
task pays interpreter start-up, importing torch/transformers/PEFT, unpacking the FAB and loading
the base model.

:func:`serve` replaces the SuperExec + ``flwr-clientapp`` pair for a SuperNode started with
``--isolation process``: it asks the SuperNode's Runtime API for ClientApp tasks
(``AcquireTask``) and runs each one in this process, through the same protocol
``flwr-clientapp`` uses (pull the task input, call the ClientApp, push the reply and the task
status), so the ClientApp's process-wide caches (base model, encoded reports) live across rounds
and runs. Each task runs in a thread and the ClientApp calls are serialised (the SuperNode hands
out one live task at a time anyway), so a stuck task cannot block later ones. It uses Flower's
Runtime API client classes, which are internal: fedmira pins ``flwr<1.43``.

Code trust: the ClientApp run here is the fedmira installed at the hospital, never code sent
by the coordinator. A task whose FAB is not fedmira, or whose ``client/`` or ``common/`` Python
files differ from the installed ones, gets an error reply naming the difference (the coordinator
logs the site as excluded) instead of running unreviewed code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

import fedmira.client as client_pkg
import fedmira.common as common_pkg

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise

APP_PUBLISHER = "fedmira"
# The SuperNode hands out a task before it has finished pulling the message's objects from the
# SuperLink; Flower's puller then backs off 1 s. A fresh flwr-clientapp needs longer than that to
# start, this process does not: poll at 50 ms instead.
PULL_BACKOFF_S = 0.05
# Flower 1.42's SuperNode can leave a task behind whose message never arrives (a message of a run
# that stopped meanwhile: RunNotRunningException is a BaseException its handler lets through).
# Each task runs in its own thread, so such a task cannot block the next; it gives up after this.
PULL_MAX_S = 600.0
CHECKED_PACKAGES = {"client": Path(client_pkg.__file__).parent, "common": Path(common_pkg.__file__).parent}


class CodeMismatch(RuntimeError):
    """The run's app is not the fedmira installed here."""


@dataclass
class TaskTiming:
    """When a task was acquired, its input pulled, the ClientApp started and ended (``time.time()``)."""

    acquired: float
    kind: str = ""
    pulled: float = 0.0
    app_started: float = 0.0
    app_ended: float = 0.0
    ok: bool = False


def _retry() -> RetryInvoker:
    """Retries transport errors a few times; never signals the process (Flower's invoker does)."""
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=5), recoverable_exceptions=(
        httpx.TransportError,), max_tries=5, max_time=60.0)


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None, interceptors=interceptors,
                                                 retry_invoker=_retry())


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except httpx.HTTPError:
            return False

    return beat


def _digest(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def installed_code() -> dict[str, str]:
    """SHA-256 of every ``client/*.py`` and ``common/*.py`` of the installed fedmira."""
    files = {f"{pkg}/{p.name}": p.read_bytes() for pkg, folder in CHECKED_PACKAGES.items()
             for p in sorted(folder.glob("*.py"))}
    return _digest(files)


def fab_code(fab_content: bytes) -> dict[str, str]:
    """SHA-256 of the FAB's ``client/*.py`` and ``common/*.py`` (the code a ClientApp runs)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
        names = [n for n in archive.namelist() if n.count("/") == 1
                 and n.split("/")[0] in CHECKED_PACKAGES and n.endswith(".py")]
        return _digest({n: archive.read(n) for n in names})


def check_code(fab_id: str, fab_content: bytes, installed: dict[str, str]) -> None:
    """Raise :class:`CodeMismatch` unless the run's app is this installation's fedmira."""
    if fab_id.split("/")[0] != APP_PUBLISHER:
        raise CodeMismatch(f"run app {fab_id!r} is not fedmira; this hospital only runs fedmira")
    sent = fab_code(fab_content)
    differ = sorted(n for n in set(sent) | set(installed) if sent.get(n) != installed.get(n))
    if differ:
        raise CodeMismatch(f"the run's fedmira code differs from the one installed at this hospital "
                           f"({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); install the "
                           "coordinator's fedmira version, or run `fedmira hospital --isolation subprocess`")


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab, int]:
    """Flower's ``run_clientapp.pull_task_input`` with a short backoff for not-yet-stored objects.

    Returns the message, context, run, FAB and the task id.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from the SuperNode's Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=1.0, max_time=PULL_MAX_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not in the deflated message
    return message, context, run, fab, int(res.task_id)


def _call_app(app: Any, message: Message, context: Context, task_id: int, lock: threading.Lock) -> Message:
    """One ClientApp call at a time (they share the loaded model), with Flower's task identity set."""
    with lock:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            task_id, context.run_id, context.node_id)
        return app(message=message, context=context)


def run_task(address: str, token: str, app: Any, installed: dict[str, str], timing: TaskTiming,
             lock: threading.Lock) -> None:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would."""
    task = _client(address, token)
    beat = HeartbeatSender(_heartbeat(task))
    beat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab, task_id = pull_task_input(task)
        timing.pulled, timing.kind = time.time(), message.metadata.message_type
        check_code(run.fab_id, fab.content, installed)
        timing.app_started = time.time()
        reply = _call_app(app, message, context, task_id, lock)
        timing.app_ended = time.time()
        status, details, timing.ok = SubStatus.COMPLETED, "", True
    except Exception as exc:  # pylint: disable=broad-exception-caught  (becomes an error reply)
        refused = isinstance(exc, CodeMismatch)
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if refused else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(exc)}:<'{exc}'>"
        log.error("ClientApp task failed: %s", details, exc_info=not refused)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        _finish_task(task, reply, context, status, details)
        beat.stop()


def _finish_task(task: RuntimeHttpClient, reply: Message | None, context: Context | None, status: str,
                 details: str) -> None:
    try:
        if reply is not None and context is not None:
            push_message(task, reply, context)
    except Exception as exc:  # pylint: disable=broad-exception-caught
        log.error("Failed to push the reply: %s", exc)
    push_task_output(task, context, status, details)
    task.close()


def _acquire(runtime: RuntimeHttpClient) -> str | None:
    try:
        res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except httpx.HTTPError as exc:
        log.warning("SuperNode Runtime API not answering (%s); retrying", exc)
        return None
    return str(res.token) if res.HasField("task") and res.token else None


def serve(address: str, stop: threading.Event, *, poll_s: float = 0.2,
          on_task: Callable[[TaskTiming], None] | None = None) -> None:
    """Run ClientApp tasks of the SuperNode whose Runtime API is at ``address`` until ``stop``.

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API (``--host``/``--port`` of ``flower-supernode``), loopback.
    stop : threading.Event
        Set it to stop taking tasks. Each task runs in a thread of its own (ClientApp calls one at
        a time), so a task whose message never arrives cannot block the next one.
    poll_s : float
        Seconds between ``AcquireTask`` calls while idle (Flower's SuperExec polls every 1 s).
    on_task : callable, optional
        Called with each task's :class:`TaskTiming` (for logs and the overhead benchmark).
    """
    from fedmira.client.client_app import app  # imported once: torch, transformers, PEFT stay loaded

    installed = installed_code()
    runtime = _client(address)
    lock = threading.Lock()
    log.info("fedmira warm executor: serving ClientApp tasks of %s in process", address)

    def work(token: str, timing: TaskTiming) -> None:
        run_task(address, token, app, installed, timing, lock)
        if on_task is not None:
            on_task(timing)

    try:
        while not stop.is_set():
            token = _acquire(runtime)
            if token is None:
                stop.wait(poll_s)
                continue
            timing = TaskTiming(acquired=time.time())
            threading.Thread(target=work, args=(token, timing), name="clientapp-task", daemon=True).start()
    finally:
        runtime.close()
