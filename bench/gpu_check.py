#!/usr/bin/env python3
"""One-command shakedown of train_gpt.py on one CUDA GPU, within 8 minutes of wall time whatever the compile
caches hold: every section runs in its own process and is cut at its own deadline.

    python bench/gpu_check.py --data-dir runs/proxy_data          # report in $OUT, else runs/gpu_check
    python bench/gpu_check.py --cpu --data-dir DATA               # the tiny CPU version (the test suite runs it)

Sections, in this order; each is recorded in the report even when it fails (its error and traceback) or is cut at
its deadline (what it saved so far, and the tail of its output), and the report is rewritten after every section:
  env        Python, torch, CUDA, cuDNN, NCCL, the GPU, and whether FA3, brotli and Triton are importable
  attention  every attention kernel at hand against fp32 math at 2x256 (output and q/k/v gradients), then forward
             and backward at 48x2048 (8 heads, 4 KV heads, dim 64) through torch.compile, timed
  compiled   the probe train_gpt runs to pick its kernel, then compiled against eager loss and gradient norm of
             the default model on one training micro-batch (48x2048, recurrence on)
  train      a default-config train_gpt.py run on the data folder, as a subprocess, with the time that is left
             (its training time shortened to fit); its log (README "What the log lines mean") parsed into
             throughput, MFU, memory, compiles, the recurrence switch, export time and bytes, evaluation times and
             tokens/s, and estimates for 8 GPUs on FineWeb
Output folder: gpu_check.json (everything), train.log (train_gpt's log), train_stderr.txt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt as t  # noqa: E402

FINEWEB_VAL_TOKENS = 45_508_608  # the challenge's val targets (sp4096)
REFERENCE_1XH100 = {"tok_s": 980_000, "peak_allocated_mib": 26_865, "attention": "cudnn 2.56 ms vs flash 3.79 ms"}

# One pattern per log line the report reads; named groups become fields (README "What the log lines mean").
LOG_LINES = {
    "attention_backend": r"^env: attention_backend: (?P<attention_backend>.+)$",
    "attention_rejected": r"^attention_probe: rejected (?P<attention_rejected>.+)$",
    "attention_cross_check": r"^attention_probe: (?!rejected )(?P<attention_cross_check>.+)$",
    "model_params": r"^model_params:(?P<model_params>\d+)$",
    "val_tokens": r"^val_tokens: (?P<val_tokens>\d+)$",
    "warmup_step": r"^warmup_step: (?P<warmup_step>\d+)/\d+$",
    "train_loss": r"^(?P<step>\d+)/\d+ train_loss: (?P<train_loss>\S+) train_time: \S+m tok/s: (?P<tok_s>\d+)$",
    "recurrence": r"^recurrence:activated at step (?P<recurrence_step>\d+)",
    "stopping_early": r"^stopping_early: wallclock_cap train_time: (?P<stop_train_ms>\d+)ms step: (?P<stop_step>\d+)/",
    "peak_memory": r"^peak memory allocated: (?P<peak_allocated_mib>\d+) MiB reserved: (?P<peak_reserved_mib>\d+) MiB",
    "train_summary": r"^train_summary: steps: (?P<steps>\d+) train_time: (?P<train_ms>\d+)ms tok/s: (?P<tok_s>\d+) "
                     r"mfu: (?P<mfu>\S+) timed_compiles: (?P<timed_compiles>\d+)$",
    "gptq_hessians": r"^gptq:hessians \d+ from \d+ batches in (?P<hessian_ms>\d+)ms$",
    "gptq_quantized": r"^gptq:quantized in (?P<quantize_ms>\d+)ms",
    "pre_quant": r"^pre-quantization post-ema val_loss:(?P<loss>\S+) val_bpb:(?P<bpb>\S+) eval_time:(?P<ms>\d+)ms$",
    "quant_knob": r"^quant:grid knob: (?P<knob>\S+) .* rtn_evals: (?P<rtn_evals>\d+) "
                  r"gptq_passes: (?P<gptq_passes>\d+)$",
    "quant_bits": r"^quant:bits_per_weight (?P<bits_per_weight>.+)$",
    "quant_verify": r"^quant:verify: (?P<quant_verify>.+)$",
    "export": r"^export: predicted (?P<predicted_bytes>\d+) actual \d+ model bytes \((?P<prediction_error>\S+)\), "
              r"compress\+write (?P<export_ms>\d+)ms$",
    "selective_prune": r"^selective_prune: (?P<selective_prune>.+)$",
    "code_size": r"^Code size: (?P<code_bytes>\d+) bytes$",
    "model_bytes": r"^Serialized model int6\+brotli: (?P<model_bytes>\d+) bytes$",
    "total_bytes": r"^Total submission size int6\+brotli: (?P<total_bytes>\d+) bytes$",
    "roundtrip": r"^final_int6_roundtrip val_loss:(?P<loss>\S+) val_bpb:(?P<bpb>\S+) eval_time:(?P<ms>\d+)ms$",
    "sliding": r"^final_int6_sliding_window val_loss:(?P<loss>\S+) val_bpb:(?P<bpb>\S+) eval_time:(?P<ms>\d+)ms$",
    "eval_attention": r"^eval_attention: (?P<eval_attention>.+)$",
    "eval_total": r"^eval_total: (?P<eval_total_ms>\d+)ms$",
    "warning": r"^WARNING: (?P<warning>.+)$",
    "error": r"^error: (?P<error>.+)$",
}
MANY = ("attention_rejected", "warmup_step", "train_loss", "quant_verify", "selective_prune", "eval_attention",
        "warning", "error")


def number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def parse_log(lines) -> dict:
    """lines: [(seconds since the run started, text)] -> {line name: fields + "t"} (a list for the MANY)."""
    found = {}
    for ts, text in lines:
        for name, rx in LOG_LINES.items():
            m = re.match(rx, text)
            if m:
                rec = {k: number(v) for k, v in m.groupdict().items()} | {"t": round(ts, 2)}
                if name in MANY:
                    found.setdefault(name, []).append(rec)
                else:
                    found[name] = rec
    return found


def throughput(points, tokens_per_step: int):
    """Tokens/s between the first and the last (step, t) point, by wall time; None with fewer than two."""
    if len(points) < 2 or points[-1]["t"] <= points[0]["t"]:
        return None
    return round((points[-1]["step"] - points[0]["step"]) * tokens_per_step / (points[-1]["t"] - points[0]["t"]))


def summarize(p: dict, tokens_per_step: int, world: int = 8) -> dict:
    """The shakedown's numbers from a parsed log; estimates for `world` GPUs on the FineWeb val (linear scaling)."""
    s = {"attention_backend": p.get("attention_backend", {}).get("attention_backend"),
         "attention_rejected": [r["attention_rejected"] for r in p.get("attention_rejected", [])],
         "attention_cross_check": p.get("attention_cross_check", {}).get("attention_cross_check"),
         "eval_attention": [r["eval_attention"] for r in p.get("eval_attention", [])],
         "model_params": p.get("model_params", {}).get("model_params"),
         "val_tokens": p.get("val_tokens", {}).get("val_tokens")}
    s |= {k: p["train_summary"][k] for k in ("steps", "train_ms", "tok_s", "mfu", "timed_compiles")} \
        if "train_summary" in p else {}
    s |= {k: p["peak_memory"][k] for k in ("peak_allocated_mib", "peak_reserved_mib")} if "peak_memory" in p else {}
    losses = [r for r in p.get("train_loss", []) if r["step"] >= 5]  # steps 1-4: the first steps' one-off costs
    if p.get("train_loss"):
        s["first_step_at_s"] = p["train_loss"][0]["t"]  # start-up: data, probe, compile warmup
    if p.get("warmup_step"):
        s["warmup_done_at_s"] = p["warmup_step"][-1]["t"]
    if "recurrence" in p:
        r = p["recurrence"]
        s |= {"recurrence_step": r["recurrence_step"], "recurrence_at_s": r["t"],
              "tok_s_before_recurrence": throughput([x for x in losses if x["t"] <= r["t"]], tokens_per_step),
              "tok_s_after_recurrence": throughput([x for x in losses if x["t"] > r["t"]], tokens_per_step)}
    if "stopping_early" in p:
        s["stopped_at_step"] = p["stopping_early"]["stop_step"]
    if "gptq_hessians" in p and "gptq_quantized" in p:
        s["gptq_ms"] = p["gptq_hessians"]["hessian_ms"] + p["gptq_quantized"]["quantize_ms"]
    for k in ("code_bytes", "model_bytes", "total_bytes"):
        src = {"code_bytes": "code_size"}.get(k, k)
        if src in p:
            s[k] = p[src][k]
    if "quant_knob" in p:
        s |= {k: p["quant_knob"][k] for k in ("knob", "rtn_evals", "gptq_passes")}
    if "quant_bits" in p:
        s["bits_per_weight"] = p["quant_bits"]["bits_per_weight"]
    if "export" in p:  # the verifying compression(s), any pruning and the write
        s |= {"export_s": round(p["export"]["export_ms"] / 1000, 2), "predicted_bytes": p["export"]["predicted_bytes"],
              "prediction_error": p["export"]["prediction_error"]}
    s["quant_verify"] = [r["quant_verify"] for r in p.get("quant_verify", [])]
    s["selective_prune"] = [r["selective_prune"] for r in p.get("selective_prune", [])]
    val = s["val_tokens"]
    for name in ("pre_quant", "roundtrip", "sliding"):
        if name in p:
            e = dict(p[name])
            e.pop("t")
            if val and e["ms"]:
                e["tokens_per_s"] = round(val / (e["ms"] / 1000))
                e[f"est_fineweb_val_{world}gpu_s"] = round(FINEWEB_VAL_TOKENS / (e["tokens_per_s"] * world), 1)
            s[name] = e
    if "eval_total" in p:
        s["eval_total_ms"] = p["eval_total"]["eval_total_ms"]
    if s.get("tok_s"):
        s[f"est_steps_in_590s_{world}gpu"] = round(s["tok_s"] * world * 590 / tokens_per_step)
    s["warnings"] = [r["warning"] for r in p.get("warning", [])]
    s["errors"] = [r["error"] for r in p.get("error", [])]
    return s


# ---------------------------------------------------------------------------------------------- sections


def section_env(ctx) -> dict:
    cuda = ctx["device"].type == "cuda"
    out = {"mode": ctx["device"].type, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "git_commit": t.git_commit(),
           "fa3": t._flash_attn_func is not None, "fa3_missing": t.FA3_MISSING}
    for mod in ("brotli", "triton", "sentencepiece"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "importable")
        except ImportError as e:
            out[mod] = f"missing ({e})"
    if cuda:
        prop = torch.cuda.get_device_properties(ctx["device"])
        out |= {"gpu": prop.name, "gpu_count": torch.cuda.device_count(), "capability": f"{prop.major}.{prop.minor}",
                "gpu_memory_gib": round(prop.total_memory / 2**30, 1), "sm_count": prop.multi_processor_count,
                "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                "peak_bf16_tflops_assumed": t.peak_flops(ctx["device"]) / 1e12}
    return out


def timed(fn, device, iters: int) -> float:
    """Mean milliseconds per call (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1000 * (time.perf_counter() - t0) / iters


def section_attention(ctx) -> dict:
    dev, cuda = ctx["device"], ctx["device"].type == "cuda"
    H, Hkv, D = 8, 4, 64
    B, T = (48, 2048) if cuda else (2, 128)
    small = (2, 256) if cuda else (1, 64)
    kinds = ((["fa3"] if t._flash_attn_func is not None else []) + ["cudnn", "flash", "efficient", "math"]) \
        if cuda else ["cpu"]
    out = {"shape_checked": f"{small[0]}x{small[1]}", "shape_timed": f"{B}x{T} heads {H}/{Hkv} dim {D}"}
    for kind in kinds:
        modes, rec = (["fa3"] if kind == "fa3" else ["sdpa", "sdpa-expand"]), {}
        out[kind] = rec
        for mode in modes:
            if cuda and mode != "fa3":
                t.sdpa_backend(kind)
            try:
                errs = t.attention_vs_math(mode, *small, H, Hkv, D, dev)
                rec[mode] = {"rel_error_vs_math": {k: float(f"{v:.3g}") for k, v in errs.items()},
                             "matches_math": max(errs.values()) < 0.05}
            except Exception as e:
                rec[mode] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        mode = next((m for m in modes if rec[m].get("matches_math")), None)
        if mode is None:
            continue
        try:  # the mode the probe would pick for this kernel, timed through compile
            torch._dynamo.reset()  # SDPA's kernel is fixed at trace time
            fn = torch.compile(lambda q, k, v: t.causal_attention(q, k, v, mode), fullgraph=True, dynamic=False,
                               **ctx["compile_kw"])
            dt = torch.bfloat16 if cuda else torch.float32
            q, k, v = (torch.randn(B, T, h, D, device=dev, dtype=dt, requires_grad=True) for h in (H, Hkv, Hkv))
            grad = torch.randn(B, T, H, D, device=dev, dtype=dt)
            step = lambda: fn(q, k, v).backward(grad)
            t0 = time.perf_counter()
            step()
            t.sync(dev)
            compile_s = time.perf_counter() - t0
            step()
            ms = timed(step, dev, 10 if cuda else 2)
            flops = 7 * B * H * T * T * D  # causal: forward 2BHT^2D, backward 2.5x that
            rec["timed"] = {"mode": mode, "fwd_bwd_ms": round(ms, 3), "tflops": float(f"{flops / ms / 1e9:.3g}"),
                            "compile_s": round(compile_s, 1)}
        except Exception as e:
            rec["timed"] = {"mode": mode, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        if cuda:
            torch.cuda.empty_cache()
        ctx["save"](out)
    kernels = {k: v for k, v in out.items() if isinstance(v, dict)}
    times = {k: v["timed"]["fwd_bwd_ms"] for k, v in kernels.items() if "fwd_bwd_ms" in v.get("timed", {})}
    out["fastest"] = min(times, key=times.get) if times else None
    # a kernel that is not available is information; one that runs and gives other numbers is a failure
    out["mismatched"] = [f"{k} {m}" for k, v in kernels.items() for m, r in v.items() if r.get("matches_math") is False]
    out["ok"] = bool(times) and not out["mismatched"]
    return out


def section_compiled(ctx) -> dict:
    dev, cuda = ctx["device"], ctx["device"].type == "cuda"
    hp = t.Hyperparameters.from_env(ctx["model_env"])
    cfg = hp.model_config()
    compile_fn = lambda f: torch.compile(f, dynamic=False, fullgraph=True, **ctx["compile_kw"])
    t0 = time.perf_counter()
    _, mode, label, rejected, checked = t.select_attention(hp, dev, cfg, compile_fn)
    out = {"probe": {"attention_backend": label, "rejected": rejected, "cross_check": checked,
                     "seconds": round(time.perf_counter() - t0, 1)}}
    ctx["save"](out)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = t.build_model(cfg, dev, mode)
    with torch.no_grad():  # away from the zero-init start, so every path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim == 2 else 0.1))
    model.recur_active = bool(cfg.recur_layers)
    B, T = hp.train_seqs // 8, hp.train_seq_len
    val = ctx.get("val_tokens")
    if val is not None and len(val) > B * (T + 1):
        tokens = torch.from_numpy(val[:B * (T + 1)].astype(np.int64)).view(B, T + 1).to(dev)
    else:
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    params = list(model.parameters())

    def grad_norm():
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])).item()
        model.zero_grad(set_to_none=True)
        return n
    chunk = max(1, min(B, 8))  # eager saves every intermediate: 8 sequences at a time, the same mean loss
    t0 = time.perf_counter()
    loss_eager = 0.0
    for i in range(0, B, chunk):
        with t.autocast_ctx(dev):
            loss = model(x[i:i + chunk], y[i:i + chunk]) * (min(chunk, B - i) / B)
        loss.backward()
        loss_eager += loss.item()
    t.sync(dev)
    out["eager"] = {"loss": loss_eager, "grad_norm": grad_norm(), "seconds": round(time.perf_counter() - t0, 2)}
    ctx["save"](out)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    compiled = compile_fn(model)

    def step():
        with t.autocast_ctx(dev):
            loss = compiled(x, y)
        loss.backward()
        return loss
    t0 = time.perf_counter()
    loss_c = step().item()
    out["compiled"] = {"loss": loss_c, "grad_norm": grad_norm(), "compile_s": round(time.perf_counter() - t0, 1)}
    ms = timed(step, dev, 3 if cuda else 1)
    model.zero_grad(set_to_none=True)
    out["compiled"] |= {"fwd_bwd_ms": round(ms, 1), "tok_s": round(B * T / (ms / 1000))}
    if cuda:
        out["compiled"]["peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) // 2**20
    e, c = out["eager"], out["compiled"]
    out["loss_abs_diff"] = abs(e["loss"] - c["loss"])
    out["grad_norm_rel_diff"] = abs(e["grad_norm"] - c["grad_norm"]) / max(e["grad_norm"], 1e-12)
    out["ok"] = out["loss_abs_diff"] < 2e-2 and out["grad_norm_rel_diff"] < 5e-2  # bf16 tolerances
    out["shape"] = f"{B}x{T}, recurrence {'on' if model.recur_active else 'off'}, {label}"
    return out


def section_train(ctx) -> dict:
    out_dir, data_dir = ctx["out"], ctx["data_dir"]
    if data_dir is None:
        raise RuntimeError("no --data-dir given: build one (README: the GPU shakedown) and pass it")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    timeout = ctx["seconds"]
    # the timed training gets what is left after train_gpt's untimed work (start-up, probe, compiles, GPTQ, export,
    # evaluations: TRAIN_OVERHEAD_S, a cold-cache estimate), at most --train-seconds and at least 30 s
    train_s = min(ctx["train_seconds"], max(30.0, timeout - TRAIN_OVERHEAD_S[ctx["device"].type]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= ctx["train_env"] | {"MAX_WALLCLOCK_SECONDS": f"{train_s:g}", "DATA_DIR": str(data_dir),
                               "OUT_DIR": str(work), "RUN_ID": "gpu_check", "PYTHONUNBUFFERED": "1"}
    env |= ctx["user_env"]
    lines, t0 = [], time.monotonic()
    with open(out_dir / "train_stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=str(ROOT), text=True,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)

        def read():
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:  # never leave it running on the GPU, nor its compile workers
            rc = end_group(proc) if rc is None else rc
        reader.join(timeout=10)
    log = work / "logs" / "gpu_check.txt"
    if log.is_file():
        shutil.copy(log, out_dir / "train.log")
    shutil.rmtree(work, ignore_errors=True)  # final_model.pt alone is ~130 MB
    parsed = parse_log(lines)
    hp = t.Hyperparameters.from_env(env)
    res = {"ok": rc == 0 and not timed_out, "returncode": rc, "timed_out": timed_out, "timeout_s": round(timeout),
           "wall_s": round(time.monotonic() - t0, 1),
           "env": {k: env[k] for k in sorted({*ctx["train_env"], *ctx["user_env"], "MAX_WALLCLOCK_SECONDS"})},
           "summary": summarize(parsed, hp.train_batch_tokens)}
    if rc != 0:
        res["stderr_tail"] = (out_dir / "train_stderr.txt").read_text(errors="replace")[-3000:]
    return res


SECTIONS = {"env": section_env, "attention": section_attention, "compiled": section_compiled, "train": section_train}
BUDGET_S = 480  # the whole command: the device machine allows 10 minutes per command
SECTION_S = {"env": 30, "attention": 75, "compiled": 105}  # each section's deadline; train gets what is left
TRAIN_OVERHEAD_S = {"cuda": 180, "cpu": 60}  # train_gpt's untimed work with cold caches (a guess: see train's report)


def end_group(proc) -> int:
    """Kill a process started with start_new_session and everything it started (compile workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def run_section(name: str, argv: list, seconds: float) -> dict:
    """Section `name` in its own process (this script with --child), ended at `seconds`. A section that overruns is
    cut (its process group killed) and reported with what it saved so far and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        result, output = Path(tmp) / "result.json", Path(tmp) / "output.txt"
        with open(output, "w") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--child", name,
                                     "--child-result", str(result)], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT), start_new_session=True)
            try:
                rc, cut = proc.wait(timeout=max(seconds, 0.0)), False
            except subprocess.TimeoutExpired:
                rc, cut = end_group(proc), True
        res = json.loads(result.read_text()) if result.is_file() else {}
        tail = output.read_text(errors="replace")[-3000:]
    if cut:
        return res | {"ok": False, "timed_out": True, "error": f"cut at its deadline ({round(seconds, 1):g}s)",
                      "output_tail": tail}
    if not res.pop("done", False):
        return res | {"ok": False, "error": f"its process ended with code {rc} before its result", "output_tail": tail}
    return res


def child(name: str, ctx: dict, path: Path) -> int:
    """The --child side of run_section: run one section, saving what it has so far (ctx["save"]) and its result."""
    save = lambda res: path.write_text(json.dumps(res, default=str))
    ctx["save"] = lambda partial: save({"ok": False, "partial": True} | partial)
    if ctx["device"].type == "cuda":
        torch.cuda.set_device(ctx["device"])
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        res = {"ok": True} | SECTIONS[name](ctx)
    except Exception as e:
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    save(res | {"done": True})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, help="DATA_DIR for the training run (shards + tokenizer)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check"))
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="MAX_WALLCLOCK_SECONDS at most (150; CPU: 10), shortened to fit the time left")
    ap.add_argument("--budget-seconds", type=float, default=BUDGET_S, help="the whole command's wall time")
    ap.add_argument("--section-seconds", action="append", default=[], metavar="NAME=S",
                    help=f"a section's deadline (defaults: {SECTION_S}; train: what is left)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for the training run")
    ap.add_argument("--cpu", action="store_true", help="tiny CPU version (also the fallback without CUDA)")
    ap.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu  # no CUDA context here: only the sections' processes make one
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch._dynamo.config.cache_size_limit = 32
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = 4096
    val_tokens = None
    if args.data_dir is not None:
        ds = sorted((args.data_dir / "datasets").glob("fineweb10B_sp*"))
        if ds:
            vocab = int(ds[0].name.rsplit("sp", 1)[1])
            val = sorted(ds[0].glob("fineweb_val_*.bin"))
            val_tokens = t.load_shard(val[0]) if val else None
    # CPU: the smoke config (4 layers x 64, sequence 128) for the model and the run; dynamo traces, no codegen
    tiny = {} if cuda else {k: v for k, v in t.smoke_env().items() if k not in ("DATA_DIR", "OUT_DIR")}
    model_env = tiny | {"VOCAB_SIZE": str(vocab)}
    train_env = {"VOCAB_SIZE": str(vocab), "TRAIN_LOG_EVERY": "10"}
    # CPU: recurrence at a fixed step and every step logged, so both throughputs exist on a slow machine too
    train_env |= {} if cuda else {"SMOKE": "1", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1", "RECUR_START_STEP": "6"}
    ctx = dict(device=device, out=args.out, data_dir=args.data_dir, val_tokens=val_tokens, model_env=model_env,
               train_env=train_env, user_env=dict(kv.split("=", 1) for kv in args.env),
               train_seconds=args.train_seconds or (150 if cuda else 10),
               compile_kw={} if cuda else {"backend": "eager"}, save=lambda partial: None)
    if args.child:
        return child(args.child, ctx, args.child_result)
    budgets = SECTION_S | {k: float(v) for k, v in (kv.split("=", 1) for kv in args.section_seconds)}
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reference_1xh100": REFERENCE_1XH100,
              "budget_s": args.budget_seconds, "sections": {}}
    path = args.out / "gpu_check.json"
    t_start = time.monotonic()
    deadline = t_start + args.budget_seconds
    for name in [s for s in SECTIONS if s in args.sections.split(",")]:
        t0 = time.monotonic()
        seconds = min(budgets.get(name, math.inf), deadline - t0)
        print(f"gpu_check: {name} (deadline {seconds:.0f}s) ...", flush=True)
        if name == "train":  # train_gpt runs as its own process group already
            try:
                res = {"ok": True} | section_train(ctx | {"seconds": seconds})
            except Exception as e:
                res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        else:
            res = run_section(name, argv, seconds)
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["deadline_s"] = round(seconds, 1)
        report["sections"][name] = res
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        path.write_text(json.dumps(report, indent=1, default=str))
        why = res.get("error") or "see the report"
        print(f"gpu_check: {name} {'ok' if res['ok'] else 'FAILED: ' + why} ({res['seconds']}s)", flush=True)
    print(f"gpu_check: report {path}", flush=True)
    return 0 if all(s["ok"] for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
