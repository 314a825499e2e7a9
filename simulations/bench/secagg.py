"""What does a Flower round with SecAgg+ cost over a plain round? Wall time, bytes, server CPU, error.

One training round of fedmira's real strategy (``server.strategy.FedmiraStrategy``, FedAvg) with
K sites answering through the real ClientApp code (``client_app.secagg_stage`` for the key and
unmask stages, ``client_app.adapter_reply`` for the masked or plain adapter), once with
``strategy.secure_aggregation=secaggplus`` and once without, side by side in one process. Every
message goes through Flower's protobuf serialisation both ways, so the bytes are wire bytes and
the (de)serialisation is in the times. What is left out, the same in both rounds: the sites'
training (each site replies with a fixed update) and network latency (SecAgg+ adds three round
trips: advertise keys, share keys, unmask).

The adapter is a real one: the embedded SmolLM2-135M's r=8 q,v LoRA (460,800 values) trained a
few steps by ``client_app.train`` on synthetic reports; site k replies with that trained update
scaled by a factor of its own, so the values have a trained adapter's magnitudes. Rows:

- the round's wall time with the sites in parallel (coordinator time + the slowest site of
  every stage), SecAgg+ over plain;
- the coordinator's CPU in the round (strategy, unmask, serialisation), over plain;
- bytes up and down per site, over plain;
- the largest |SecAgg+ global adapter - plain global adapter| over the stated quantization bound
  (``common.secagg.error_bound``), with the config defaults users get.

::

    python -m fedmira.simulations.bench.secagg               # 8 and 42 sites, SmolLM2 (~2 minutes)
    python -m fedmira.simulations.bench.secagg --quick       # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from fedmira.simulations.bench.common import BenchRow

#: Node ids of the simulated sites start here (0 and 1 are Flower's own).
FIRST_NODE = 1001


@dataclass
class SerdeGrid:
    """A Grid that runs each site's handler in this process, through protobuf both ways.

    Times are split between the coordinator (building and serialising its messages, reading the
    replies) and each site (reading the message, its handler, serialising its reply); per stage
    the slowest site is what a real round would wait for.
    """

    contexts: dict[int, Any]
    handlers: dict[str, Callable[[Any, Any], Any]]
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    site_cpu: float = 0.0  # all sites together (they run one after another here)
    site_wall: float = 0.0
    waited: float = 0.0  # sum over stages of the slowest site: what a parallel round waits
    _ids: int = 0

    def get_node_ids(self) -> list[int]:
        """Return the sites' node ids."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Deliver each message to its site and return the replies (the timeout cannot pass here)."""
        from flwr.app import Message, Metadata
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        replies, slowest = [], 0.0
        for m in messages:
            self._ids += 1
            nid = int(m.metadata.dst_node_id)
            meta = Metadata(run_id=1, message_id=f"m{self._ids}", src_node_id=1, dst_node_id=nid,
                            reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type=m.metadata.message_type)
            wire = message_to_proto(Message(content=m.content, metadata=meta)).SerializeToString()
            self.down[nid] = self.down.get(nid, 0) + len(wire)
            c0, w0 = time.process_time(), time.perf_counter()
            msg = message_from_proto(ProtoMessage.FromString(wire))
            reply = self.handlers[msg.metadata.message_type](msg, self.contexts[nid])
            back = message_to_proto(reply).SerializeToString()
            took = time.perf_counter() - w0
            self.site_cpu += time.process_time() - c0
            self.site_wall += took
            slowest = max(slowest, took)
            self.up[nid] = self.up.get(nid, 0) + len(back)
            replies.append(message_from_proto(ProtoMessage.FromString(back)))
        self.waited += slowest
        return replies


@functools.lru_cache(maxsize=2)
def trained_adapter(quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Return (initial, trained) LoRA states of the bench model and its label.

    The trained one comes from the real ``client_app.train`` at one synthetic site; trained
    once per process (the 8- and 42-site rounds share it). Callers must not modify the arrays.
    """
    import fedmira.client.client_app as client_app
    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.compose import compose_config
    from fedmira.common.model import apply_lora, load_base_model

    base = ["+debug=tiny"] if quick else ["train.batch_size=2", "train.threads=2"]
    steps, lr = (4, 5e-3) if quick else (4, 2e-3)
    cfg = compose_config([*base, f"train.steps={steps}"])
    model = apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=cfg.train.seed)
    initial = {k: v.detach().float().numpy() for k, v in get_adapter_state(model).items()}
    del model
    with tempfile.TemporaryDirectory(prefix="fedmira-bench-secagg-") as tmp:
        folder = _site_folder(Path(tmp) / "trainer", 24, seed=3)
        reply = client_app.train(_train_message(initial, lr, steps), _context(cfg, 1, folder))
    trained = {k: a.numpy().astype(np.float32) for k, a in reply.content["arrays"].items()}
    return initial, trained, "tiny random model" if quick else "embedded SmolLM2-135M"


def _site_folder(folder: Path, reports: int, seed: int) -> Path:
    from fedmira.common.reports import write_jsonl
    from fedmira.common.synthetic import make_synthetic_corpus

    corpus = make_synthetic_corpus(num_sites=1, num_reports=reports + 2, seed=seed)
    write_jsonl(corpus[:reports], folder / "train.jsonl")
    write_jsonl(corpus[reports:], folder / "val.jsonl")
    return folder


def _context(cfg: Any, node_id: int, folder: Path) -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=node_id, state=RecordDict(), run_config=cfg.to_run_config(),
                   node_config={"data-path": str(folder), "site-id": folder.name})


def _train_message(state: dict[str, np.ndarray], lr: float, steps: int) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    meta = Metadata(run_id=1, message_id="trainer", src_node_id=1, dst_node_id=1, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                          "config": ConfigRecord({"global-round": 1, "lr": lr, "local-steps": steps})})
    return Message(content=content, metadata=meta)


def measure(sites: int, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """One plain and one SecAgg+ round over ``sites`` sites: times, bytes and the error."""
    with tempfile.TemporaryDirectory(prefix="fedmira-bench-secagg-") as tmp:
        root = Path(tmp)
        initial, trained, label = trained_adapter(quick)
        rng = np.random.default_rng(seed)
        counts = {FIRST_NODE + i: int(c) for i, c in enumerate(rng.integers(8, 40, sites))}
        scale = {nid: float(s) for nid, s in zip(counts, rng.uniform(0.5, 1.5, sites))}
        folders = {nid: _site_folder(root / f"site_{nid}", n, seed=nid) for nid, n in counts.items()}
        out: dict[str, Any] = {"label": label, "values": sum(a.size for a in trained.values()),
                               "max_abs": max(float(np.abs(a).max()) for a in trained.values())}
        for mode in ("none", "secaggplus"):
            out[mode] = _round(mode, initial, trained, counts, scale, folders, quick)
        plain, secure = out["none"].pop("arrays"), out["secaggplus"].pop("arrays")
        out["error"] = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
        out["bound"] = out["secaggplus"]["bound"]
        return out


def _round(mode: str, initial: dict[str, np.ndarray], trained: dict[str, np.ndarray], counts: dict[int, int],
           scale: dict[int, float], folders: dict[int, Path], quick: bool) -> dict[str, Any]:
    """One training round of the real strategy over a SerdeGrid; its costs and global adapter."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedmira.client.client_app as client_app
    from fedmira.common.compose import compose_config
    from fedmira.common.secagg import SecAggParams, error_bound
    from fedmira.server.strategies import build_strategy

    cfg = compose_config([*(["+debug=tiny"] if quick else []), "strategy.rounds=1",
                          "strategy.fraction_train=1.0", "strategy.min_train_sites=2", "eval.every=0",
                          f"strategy.secure_aggregation={mode}"])
    update = {k: trained[k] - initial[k] for k in initial}

    def site_train(msg: Message, context: Any) -> Message:
        """Reply as a site after its (left out) training: the global adapter plus its own update."""
        nid = int(context.node_id)
        glob = msg.content["arrays"].to_numpy_ndarrays()
        state = {k: torch.from_numpy(g + scale[nid] * update[k])
                 for k, g in zip(msg.content["arrays"].keys(), glob)}
        arrays = client_app.adapter_reply(msg, context, state, counts[nid], cfg.strategy.transport_dtype)
        metrics = MetricRecord({"num-examples": counts[nid], "train-loss": 1.0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics,
                                   "site": ConfigRecord({"site-id": f"site_{nid}"})}), reply_to=msg)

    grid = SerdeGrid({nid: _context(cfg, nid, f) for nid, f in folders.items()},
                     {"train": site_train, "train.secagg": client_app.secagg_stage})
    saved = {n: getattr(TaskIdentity, n, None) for n in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0  # the ServerApp's
    try:
        strategy = build_strategy(cfg)
        c0, w0 = time.process_time(), time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(_arrays(initial)),  # type: ignore[arg-type]
                                num_rounds=1, timeout=600, train_config=ConfigRecord())
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        for n, v in saved.items():
            setattr(TaskIdentity, n, v)
    s = cfg.strategy
    bound = error_bound(list(counts.values()), SecAggParams(
        num_shares=s.secagg_num_shares, reconstruction_threshold=s.secagg_reconstruction_threshold,
        clipping_range=s.secagg_clipping_range, quantization_range=s.secagg_quantization_range,
        max_weight=max(counts.values()))) if mode != "none" else 0.0
    return {"arrays": {k: v.numpy() for k, v in result.arrays.items()},
            "server_cpu": cpu - grid.site_cpu,  # everything but the sites: strategy, unmask, serde
            "round_wall": wall - grid.site_wall + grid.waited,  # the sites of a stage in parallel
            "site_wall": grid.site_wall / len(counts),
            "up": float(np.median(list(grid.up.values()))),
            "down": float(np.median(list(grid.down.values()))),
            "bound": bound}


def _arrays(state: dict[str, np.ndarray]) -> dict[str, Any]:
    from flwr.app import Array

    return {k: Array(v) for k, v in state.items()}


def rows_for(sites: int, m: dict[str, Any]) -> list[BenchRow]:
    """Bench rows of one measurement (each with the plain round as the baseline)."""
    sec, plain = m["secaggplus"], m["none"]
    note = f"{m['label']}, {m['values']:,} values; FedAvg, training left out (same in both)"
    return [
        BenchRow(f"SecAgg+ round wall, sites in parallel / plain round ({sites} sites)", sec["round_wall"],
                 "s", plain["round_wall"], note=note + "; +3 round trips of latency not counted"),
        BenchRow(f"SecAgg+ coordinator CPU / plain round ({sites} sites)", sec["server_cpu"], "s",
                 plain["server_cpu"], note="strategy + unmask + protobuf serialisation"),
        BenchRow(f"SecAgg+ site time per round / plain ({sites} sites)", sec["site_wall"] * 1e3, "ms",
                 plain["site_wall"] * 1e3, note="keys, shares, quantize + masks; + protobuf"),
        BenchRow(f"SecAgg+ bytes up per site / plain ({sites} sites)", sec["up"] / 1e6, "MB",
                 plain["up"] / 1e6, note="protobuf wire bytes: masked uint32 + keys, ciphertexts, shares"),
        BenchRow(f"SecAgg+ bytes down per site / plain ({sites} sites)", sec["down"] / 1e6, "MB",
                 plain["down"] / 1e6, note="global adapter + neighbours' keys and ciphertexts"),
        BenchRow(f"SecAgg+ max |global - plain global| / stated bound ({sites} sites)", m["error"] * 1e6,
                 "1e-6", m["bound"] * 1e6, target="<= 1",
                 note=f"defaults: clipping 2, 2^24 levels; max |value| {m['max_abs']:.3g}"),
    ]


def run(quick: bool) -> list[BenchRow]:
    """8 and 42 sites with SmolLM2 (``quick``: 8 sites, the tiny random model)."""
    return [row for k in ((8,) if quick else (8, 42)) for row in rows_for(k, measure(k, quick=quick))]


def main(argv: list[str] | None = None) -> None:
    """Print the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 42])
    parser.add_argument("--quick", action="store_true", help="the tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)
    for k in args.sites:
        for row in rows_for(k, measure(k, quick=args.quick)):
            print(f"{row.name:<72} {row.value:10.4g} {row.unit:<4} baseline {row.baseline:10.4g}  "
                  f"x{row.ratio:.2f}")


if __name__ == "__main__":
    main()
