"""Data-parallel local training at one site: ``train.devices`` processes, one adapter out.

A hospital with several GPUs trains its round on all of them. The site's process spawns one
training process per device for the round (``torch.multiprocessing`` with the ``spawn`` start
method, which CUDA requires), each loads the base model, takes the same global adapter, and
runs :func:`fedmira.common.engine.train_steps` with a :class:`Shard`: every process draws the
same seeded batches, computes the loss of its own slice of each step's rows, and one
``all_reduce`` per step sums the gradients (and the step's loss), so each process takes the
same optimizer step. Rank 0 writes the adapter, the numbers and AdamW's moments to a private
temporary folder, which the site reads back; the processes exit after the round.

Why not ``DistributedDataParallel``: DDP reduces gradients per backward pass, while a fedmira
step normalises the loss by the target tokens of the *whole* accumulated step; reducing once,
after the step's micro-batches, gives the single-process gradient exactly (up to summation
order) and one collective per step instead of one per micro-batch. Why not ``accelerate``:
it wraps the same DDP and adds a launcher, where a round needs only a function call.

Only the site's own processes see its examples (they travel by pipe between processes on the
same machine, never over the network); nothing here logs report text.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedmira.common.config import LoraConfig, ModelConfig, TrainConfig
from fedmira.common.errors import ConfigError, FedmiraError
from fedmira.common.prompts import Example


@dataclass(frozen=True)
class Shard:
    """A process's place in a site's data-parallel group: rank ``rank`` of ``world``."""

    rank: int
    world: int

    def rows(self, idx: Sequence[int]) -> list[int]:
        """Return this rank's contiguous slice of a micro-batch's rows (sizes differ by at most 1)."""
        n, world = len(idx), self.world
        start = self.rank * (n // world) + min(self.rank, n % world)
        size = n // world + (1 if self.rank < n % world else 0)
        return list(idx[start : start + size])

    def all_reduce(self, params: Sequence[torch.Tensor], extra: torch.Tensor) -> torch.Tensor:
        """Sum every rank's gradients of ``params`` (in place) and ``extra`` in one collective.

        A rank whose slice of the step was empty contributes zeros. Returns the summed ``extra``.
        """
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.reshape(-1).float()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].reshape(extra.shape)


def site_devices(devices: int, model_device: str) -> list[torch.device]:
    """Return the devices of ``train.devices`` for a site whose model runs on ``model.device``.

    CUDA: ``devices`` GPUs (0: every visible one), at most those visible. CPU: ``devices``
    gloo processes (0: one), for sites without GPUs and for CI. MPS has no collective backend.

    Raises
    ------
    ConfigError
        More GPUs asked than visible, or several devices on MPS.
    """
    from fedmira.common.model import resolve_device

    base = resolve_device(model_device)
    if base.type == "cuda":
        visible = torch.cuda.device_count()
        n = devices or visible
        if n > visible:
            raise ConfigError(
                f"train.devices={devices} asks for {n} GPUs but this site sees {visible} "
                "(CUDA_VISIBLE_DEVICES); set train.devices to at most that, or 0 for all of them.")
        return [torch.device("cuda", i) for i in range(n)]
    n = devices or 1
    if base.type != "cpu" and n > 1:
        raise ConfigError(f"train.devices={devices} needs CUDA or CPU processes; {base.type} has no "
                          "collective backend. Set train.devices=1.")
    return [torch.device("cpu")] * n


@dataclass(frozen=True)
class ParallelJob:
    """Everything a training process needs, picklable (no model, no open files)."""

    model: ModelConfig
    lora: LoraConfig
    freeze_a: bool
    adapter: Mapping[str, torch.Tensor]
    examples: Sequence[Example]
    train: TrainConfig
    pad_id: int
    #: ``train_steps`` keywords: seed, lr, steps, proximal, global_step, total_steps, optimizer_state.
    kwargs: Mapping[str, Any]
    devices: Sequence[str]
    threads: int
    folder: str


def parallel_train_steps(
    model_cfg: ModelConfig, lora_cfg: LoraConfig, adapter: Mapping[str, torch.Tensor],
    examples: Sequence[Example], cfg: TrainConfig, devices: Sequence[torch.device], pad_id: int, *,
    freeze_a: bool = False, **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run :func:`train_steps` data-parallel over ``devices``; return (TrainResult, adapter).

    ``adapter`` is the full LoRA state to start from (every trainable and frozen LoRA tensor,
    as ``get_adapter_state`` gives it), loaded with strict key checks in every process.
    ``kwargs`` are ``train_steps``' keywords (not ``progress`` / ``on_step``, which stay in
    rank 0's process). The result's numbers cover all processes' rows.

    Raises
    ------
    FedmiraError
        When a training process fails (its traceback is in the site's log, above).
    """
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, start_processes

    unknown = set(kwargs) - {"seed", "lr", "steps", "proximal", "autocast", "global_step", "total_steps",
                             "optimizer_state"}
    if unknown:
        raise TypeError(f"parallel_train_steps got unsupported train_steps keywords {sorted(unknown)}")
    per_process = max(1, (cfg.threads or torch.get_num_threads()) // len(devices))
    with tempfile.TemporaryDirectory(prefix="fedmira-dp-") as folder:
        os.chmod(folder, 0o700)  # the adapter and AdamW moments are the site's; keep them private
        job = ParallelJob(model=model_cfg, lora=lora_cfg, freeze_a=freeze_a,
                          adapter={k: v.detach().cpu() for k, v in adapter.items()}, examples=list(examples),
                          train=cfg, pad_id=pad_id, kwargs=_cpu(kwargs), devices=[str(d) for d in devices],
                          threads=per_process, folder=folder)
        try:
            start_processes(_process, args=(job,), nprocs=len(devices), join=True,
                            start_method="spawn")
        except ProcessRaisedException as exc:
            raise FedmiraError(f"data-parallel training failed in one of its {len(devices)} processes "
                               f"(train.devices): {exc.msg.strip().splitlines()[-1]}") from exc
        except ProcessExitedException as exc:
            raise FedmiraError(f"a data-parallel training process exited with code {exc.exit_code} "
                               "(killed, or out of memory); see the site's log") from exc
        out = torch.load(Path(folder) / "result.pt", map_location="cpu", weights_only=False)
    return out["result"], out["adapter"]


def _cpu(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Move tensors in ``train_steps`` keywords to the CPU for pickling to the processes."""
    moved = dict(kwargs)
    if moved.get("proximal") is not None:
        mu, ref = moved["proximal"]
        moved["proximal"] = (mu, [r.detach().cpu() for r in ref])
    if moved.get("optimizer_state") is not None:
        moved["optimizer_state"] = {k: v.detach().cpu() for k, v in moved["optimizer_state"].items()}
    return moved


def _process(rank: int, job: ParallelJob) -> None:
    """One training process: join the group, build the model, train its shard, rank 0 saves."""
    import torch.distributed as dist

    from fedmira.common.adapters import get_adapter_state, set_adapter_state
    from fedmira.common.engine import train_steps
    from fedmira.common.model import apply_lora, load_base_model, set_lora_a_trainable

    device = torch.device(job.devices[rank])
    torch.set_num_threads(job.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{job.folder}/rendezvous", rank=rank,
                            world_size=len(job.devices))
    try:
        loaded = load_base_model(dataclasses.replace(job.model, device=str(device)))
        model = apply_lora(loaded.model, job.lora)
        set_adapter_state(model, job.adapter)  # strict: the same keys and shapes as the site's
        set_lora_a_trainable(model, not job.freeze_a)
        kwargs = dict(job.kwargs)
        kwargs.setdefault("autocast", loaded.autocast)
        result = train_steps(model, job.examples, job.train, device, job.pad_id,
                             shard=Shard(rank, len(job.devices)), **kwargs)
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in get_adapter_state(model).items()}
            tmp = Path(job.folder) / "result.tmp"
            torch.save({"result": result, "adapter": state}, tmp)
            os.replace(tmp, Path(job.folder) / "result.pt")
    finally:
        dist.destroy_process_group()
