"""What a hospital's GPU server should see: fedmira's site code on CUDA, checked and timed.

Run on a CUDA machine (no data, no downloads: random models built from configs)::

    python simulations/scripts/cuda_check.py --out cuda_check.json

1. ``model.device=auto`` picks CUDA and ``dtype=auto`` picks bf16 (fp16 where bf16 is missing).
2. Plain LoRA training, DP-SGD (Opacus hooks) and batched generation run in bf16 on the GPU:
   finite losses, the loss goes down, the adapter comes back as float32 CPU tensors.
3. With LoRA dropout off and fp32, training on CUDA gives the same adapter as on the CPU
   (same seeded batches), so a site's GPU does not change what it contributes.
4. Timing on a SmolLM2-135M-shaped random model (30 layers, hidden 576), batch 8 and 32 x 128
   tokens: a plain step, a DP-SGD step with ``privacy.clipping=flat`` (the default) and with
   ``opacus``, and their ratios to the plain step, fp32 and bf16 (target: flat <= 1.2x).
5. QLoRA: a Llama-2-7B-shaped random model loaded in nf4 by fedmira's loader, LoRA r=8 q,v:
   weight footprint (vs bf16), peak memory and tokens/s of a training step (batch 4 x 512), and
   the memory estimate against the measured peak.
6. ``train.devices=2`` (when two GPUs are visible): the adapter equals one process's (bf16, so
   within 1% of its largest value) and tokens/s of 1 vs 2 processes.
7. The memory estimate (``common/memory.py``, what ``fedmira hospital --preflight`` prints)
   against ``torch.cuda.max_memory_allocated`` of a training step: SmolLM2-shaped bf16 with and
   without gradient checkpointing here, the 7B nf4 model in check 5 (target: within 15%).
Prints one JSON document (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch


def _tiny(device: str, dtype: str) -> Any:
    from fedmira.common.config import ModelConfig
    from fedmira.common.model import load_base_model

    return load_base_model(ModelConfig(name_or_path="tiny-random", device=device, dtype=dtype))


def _reports(n: int) -> list[Any]:
    from fedmira.common.synthetic import make_synthetic_corpus

    return list(make_synthetic_corpus(num_sites=2, num_reports=max(n, 8), seed=5))[:n]


def check_bf16_site_path() -> dict[str, Any]:
    """Auto device/dtype, plain + DP training and generation on the GPU."""
    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.config import DataConfig, GenerateConfig, LoraConfig, TrainConfig
    from fedmira.common.engine import encode_reports, evaluate_loss, generate, train_steps
    from fedmira.common.model import apply_lora
    from fedmira.common.privacy import AccountantState, dp_train_steps

    loaded = _tiny("auto", "auto")
    data = DataConfig(max_length=224, max_target_tokens=48)
    reports = _reports(16)
    ex = encode_reports(reports, loaded.tokenizer, data)
    pad = int(loaded.tokenizer.pad_token_id)
    model = apply_lora(loaded.model, LoraConfig(), seed=0)
    before, _ = evaluate_loss(model, ex, loaded.device, pad)
    plain = train_steps(model, ex, TrainConfig(steps=10, batch_size=4, lr=1e-2), loaded.device, pad)
    after, _ = evaluate_loss(model, ex, loaded.device, pad)
    ledger = AccountantState(units=len(ex), noise_multiplier=1.0, sample_rate=0.25, planned_steps=5)
    dp = dp_train_steps(model, ex, list(range(len(ex))), TrainConfig(steps=5, batch_size=4, lr=1e-3), ledger,
                        loaded.device, pad, max_grad_norm=1.0, seed=0)
    texts = generate(model, loaded.tokenizer, reports[:8], data,
                     GenerateConfig(max_new_tokens=8, batch_size=8), loaded.device)
    state = get_adapter_state(model)
    return {
        "device": str(loaded.device), "dtype": str(loaded.dtype),
        "loss_before": before, "loss_after_plain": after, "plain_mean_loss": plain.mean_loss,
        "dp_steps": dp.steps, "dp_mean_loss": dp.mean_loss, "dp_epsilon": dp.epsilon,
        "generated": len(texts), "adapter_dtypes": sorted({str(v.dtype) for v in state.values()}),
        "adapter_devices": sorted({v.device.type for v in state.values()}),
        "ok": bool(math.isfinite(after) and after < before and math.isfinite(dp.mean_loss)
                   and all(v.device.type == "cpu" for v in state.values())),
    }


def check_cpu_cuda_agree() -> dict[str, Any]:
    """fp32, dropout off: the adapter after 3 seeded steps on CUDA equals the CPU one."""
    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.config import DataConfig, LoraConfig, TrainConfig
    from fedmira.common.engine import encode_reports, train_steps
    from fedmira.common.model import apply_lora

    states = {}
    for device in ("cpu", "cuda"):
        loaded = _tiny(device, "float32")
        ex = encode_reports(_reports(12), loaded.tokenizer, DataConfig(max_length=224, max_target_tokens=48))
        model = apply_lora(loaded.model, LoraConfig(dropout=0.0), seed=0)
        train_steps(model, ex, TrainConfig(steps=3, batch_size=4, lr=1e-2), loaded.device,
                    int(loaded.tokenizer.pad_token_id), seed=1)
        states[device] = get_adapter_state(model)
    diff = max(float((states["cpu"][k] - states["cuda"][k]).abs().max()) for k in states["cpu"])
    scale = max(float(v.abs().max()) for v in states["cpu"].values())
    return {"max_abs_diff": diff, "max_abs_value": scale, "ok": diff <= 1e-4 * max(scale, 1.0)}


def _smollm2_shaped(dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device="cuda", dtype=dtype).eval()


def time_dp_cost(dtype: torch.dtype, pairs: int = 5, batch: int = 8, length: int = 128) -> dict[str, Any]:
    """Median seconds per plain and DP-SGD step (3 steps per call) on a SmolLM2-shaped model."""
    from fedmira.common.config import LoraConfig, TrainConfig
    from fedmira.common.engine import train_steps
    from fedmira.common.model import apply_lora
    from fedmira.common.privacy import AccountantState, dp_train_steps
    from fedmira.common.prompts import IGNORE_INDEX, Example

    model = apply_lora(_smollm2_shaped(dtype), LoraConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    ex = []
    for _ in range(batch):
        ids = torch.randint(5, 49000, (length,), generator=g).tolist()
        ex.append(Example(ids, [IGNORE_INDEX] * (length - 24) + ids[-24:]))
    cfg = TrainConfig(steps=3, batch_size=batch, lr=1e-4)
    device = torch.device("cuda")

    def plain() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_steps(model, ex, cfg, device, 0, seed=0)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / cfg.steps

    def dp(clipping: str) -> float:
        ledger = AccountantState(units=batch, noise_multiplier=1.0, sample_rate=1.0, planned_steps=3)
        torch.cuda.synchronize()
        t = time.perf_counter()
        dp_train_steps(model, ex, list(range(batch)), cfg, ledger, device, 0, max_grad_norm=1.0, seed=0,
                       clipping=clipping)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / cfg.steps

    calls = {"flat": lambda: dp("flat"), "opacus": lambda: dp("opacus"), "plain": plain}
    for call in calls.values():
        call()  # warm-up
    names = list(calls)
    rounds = [{n: calls[n]() for n in names[i % 3:] + names[: i % 3]} for i in range(pairs)]
    peaks = {}
    for name, call in calls.items():
        torch.cuda.reset_peak_memory_stats()
        call()
        peaks[name] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    flat_ratio = statistics.median(r["flat"] / r["plain"] for r in rounds)
    return {
        "dtype": str(dtype), "batch": batch, "length": length,
        "plain_s_per_step": statistics.median(r["plain"] for r in rounds),
        "dp_flat_s_per_step": statistics.median(r["flat"] for r in rounds),
        "dp_opacus_s_per_step": statistics.median(r["opacus"] for r in rounds),
        "ratio_flat_median": flat_ratio,
        "ratio_opacus_median": statistics.median(r["opacus"] / r["plain"] for r in rounds),
        "peak_mb": peaks, "ok": flat_ratio <= 1.2,  # issue 18's target: DP step <= 1.2x a plain one
    }


def check_qlora(layers: int = 32, batch: int = 4, length: int = 512, steps: int = 3,
                device: str = "cuda") -> dict[str, Any]:
    """QLoRA on a Llama-2-7B-shaped random model (``layers`` of its 32 blocks) loaded in nf4.

    The model is built in bf16, saved to a temporary folder and loaded by fedmira's own loader
    with ``model.quantization=nf4`` (then LoRA r=8 on q,v): weight footprint against bf16's, peak
    GPU memory and tokens/s of a training step.
    """
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmira.common.config import LoraConfig, ModelConfig
    from fedmira.common.model import apply_lora, build_tiny_tokenizer, load_base_model

    cuda = device.startswith("cuda")
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32)
    with tempfile.TemporaryDirectory(prefix="fedmira-qlora-") as tmp:
        with torch.device(device):
            full = LlamaForCausalLM(config).to(torch.bfloat16)
        bf16_bytes = full.get_memory_footprint()
        full.save_pretrained(tmp, safe_serialization=True)
        del full
        build_tiny_tokenizer().save_pretrained(tmp)  # any tokenizer: the inputs below are ids
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        loaded = load_base_model(ModelConfig(name_or_path=tmp, device=device, quantization="nf4"))
        nf4_bytes = loaded.model.get_memory_footprint()
        model = apply_lora(loaded.model, LoraConfig(r=8, alpha=16, dropout=0.0), seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, 32000, (batch, length), device=device)
        times = []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        finite = bool(torch.isfinite(loss))
        del optimizer, loss
        memory = _memory_vs_estimate(model, batch, length, 32000, device) if cuda else {}
        return {"ok": finite and memory.get("ok", True),
                "layers": layers, "batch": batch, "length": length,
                "bf16_weights_gb": round(bf16_bytes / 1e9, 3),
                "nf4_weights_gb": round(nf4_bytes / 1e9, 3),
                "peak_gb": round(peak, 2),
                "tokens_per_s": round(batch * length / statistics.median(times[1:])),
                "memory_estimate": memory}


def _memory_vs_estimate(model: Any, batch: int, length: int, vocab: int, device: str,
                        checkpointing: bool = False) -> dict[str, Any]:
    """``common.memory``'s estimate of a training step beside its measured peak (target: within 15%)."""
    from fedmira.common.memory import memory_check
    from fedmira.common.prompts import IGNORE_INDEX

    ids = torch.randint(5, vocab - 1, (batch, length), device=device)
    labels = ids.clone()
    labels[:, : length - 96] = IGNORE_INDEX  # 96 impression tokens a row, as the estimate assumes
    step = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    estimate, measured = memory_check(model, step, gradient_checkpointing=checkpointing)
    ratio = estimate.peak_allocated / measured if measured else float("nan")
    return {"ok": abs(ratio - 1) <= 0.15, "estimated_peak_gib": round(estimate.peak_allocated / 2 ** 30, 3),
            "measured_peak_gib": round(measured / 2 ** 30, 3), "ratio": round(ratio, 3),
            "checkpointing": checkpointing}


def check_memory_estimate(batch: int = 8, length: int = 512) -> dict[str, Any]:
    """Compare the memory estimate with the measured peak: SmolLM2-shaped bf16, +/- checkpointing.

    The 7B nf4 case is in check 5.
    """
    from fedmira.common.config import LoraConfig
    from fedmira.common.model import apply_lora

    model = apply_lora(_smollm2_shaped(torch.bfloat16), LoraConfig(dropout=0.0), seed=0)
    rows = [_memory_vs_estimate(model, batch, length, 49152, "cuda", checkpointing=c) for c in (False, True)]
    return {"ok": all(r["ok"] for r in rows), "bf16": rows[0], "bf16_checkpointing": rows[1]}


def check_data_parallel(batch: int = 16, length: int = 128, steps: int = 6) -> dict[str, Any]:
    """``train.devices=2`` on two GPUs: the same adapter as one process, and tokens/s of each.

    A SmolLM2-shaped random model saved in bf16 to a temporary folder (the processes load the
    base model by config, as a site's do), LoRA dropout off; tokens/s from the training loop of
    rank 0 (process start and model load excluded: they are paid once per round).
    """
    import tempfile

    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.config import LoraConfig, ModelConfig, TrainConfig
    from fedmira.common.engine import train_steps
    from fedmira.common.model import apply_lora, build_tiny_tokenizer, load_base_model
    from fedmira.common.parallel import parallel_train_steps
    from fedmira.common.prompts import IGNORE_INDEX, Example

    if torch.cuda.device_count() < 2:
        return {"ok": None, "skipped": f"{torch.cuda.device_count()} GPU visible; needs 2"}
    g = torch.Generator().manual_seed(0)
    ex = []
    for _ in range(batch * 2):
        ids = torch.randint(5, 49000, (length,), generator=g).tolist()
        ex.append(Example(ids, [IGNORE_INDEX] * (length - 24) + ids[-24:]))
    lora = LoraConfig(dropout=0.0)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3)
    with tempfile.TemporaryDirectory(prefix="fedmira-dp2-") as tmp:
        _smollm2_shaped(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        build_tiny_tokenizer().save_pretrained(tmp)
        model_cfg = ModelConfig(name_or_path=tmp, device="cuda", dtype="bfloat16")
        loaded = load_base_model(model_cfg)
        model = apply_lora(loaded.model, lora, seed=0)
        start = get_adapter_state(model)
        one = train_steps(model, ex, cfg, loaded.device, 0, seed=0, autocast=loaded.autocast)
        single = get_adapter_state(model)
        two, parallel = parallel_train_steps(model_cfg, lora, start, ex, cfg,
                                             [torch.device("cuda", 0), torch.device("cuda", 1)], 0, seed=0,
                                             autocast=loaded.autocast)
    diff = max(float((parallel[k] - single[k]).abs().max()) for k in single)
    scale = max(float(v.abs().max()) for v in single.values())
    return {"ok": diff <= 1e-2 * max(scale, 1e-3), "max_abs_diff": diff, "max_abs_value": scale,
            "tokens_per_s_1": round(one.tokens_per_s), "tokens_per_s_2": round(two.tokens_per_s),
            "speedup": round(two.tokens_per_s / one.tokens_per_s, 2) if one.tokens_per_s else None}


def main() -> None:
    """Run the checks on the GPU and print (and with ``--out`` write) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: this check is for a GPU machine.")
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("bf16_site_path", check_bf16_site_path), ("cpu_cuda_agree", check_cpu_cuda_agree),
                     ("dp_cost_fp32", lambda: time_dp_cost(torch.float32)),
                     ("dp_cost_bf16", lambda: time_dp_cost(torch.bfloat16)),
                     ("dp_cost_bf16_batch32", lambda: time_dp_cost(torch.bfloat16, batch=32)),
                     ("qlora_nf4_7b_shape", check_qlora), ("data_parallel_2_gpus", check_data_parallel),
                     ("memory_estimate", check_memory_estimate)):
        t = time.perf_counter()
        try:
            report[name] = {**fn(), "seconds": round(time.perf_counter() - t, 1)}
        except Exception as exc:  # report every check, even after one fails
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(name, json.dumps(report[name]), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
