#!/usr/bin/env python3
"""Assemble a record folder from the logs of a multi-seed run::

    python make_record.py --logs logs/seed42.txt logs/seed314.txt logs/seed999.txt \\
        --name NAME --author WHO --github-id ID --blurb TEXT [--baseline-pr N --baseline-bpb x,y,z] \\
        [--script dist/train_gpt.py] [--technique-summary S] [--hardware H] [--out DIR] [--force]

writes the wrapped train_gpt.py, the logs (as train_seed<S>.log), submission.json (upstream's
keys), README.md (results, Reproduce, Compliance) and train_curves.png into DIR, or nothing at
all if any check fails.  From each log it reads only the ``summary: {json}`` line and the
``Hyperparameters:`` block of its one training run (mode "train"; EVAL_ONLY / EXPORT_ONLY runs
appended under the same RUN_ID are ignored).  All logs must share code, tokenizer, data,
hyperparameters (apart from seed, ids, ranks and per-run paths) and score line.  ``--force``
replaces only a previous record folder (one holding submission.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

from build_wrapper import WrapperError, extract_source, make_wrapper, split_lines
from train_gpt import ConfigError, Hyperparameters, env_text, finite_or_null, parse_setting, write_atomic

MAX_ARTIFACT_BYTES = 16_000_000
MAX_TRAIN_MS = 600_000  # training + GPTQ
MAX_EVAL_MS = 600_000
TRACK = "10min_16mb"
# Hyperparameters that may differ between the seeds of one record (ids, ranks, per-run paths).
HPARAMS_MAY_DIFFER = frozenset({"seed", "run_id", "rank", "local_rank", "out_dir", "dump_token_nll"})
# Settings left out of the Reproduce command: per run, set by torchrun, or the data layout that
# data/prepare.py download writes by default.
NOT_REPRODUCED = HPARAMS_MAY_DIFFER | {"world_size", "data_dir", "train_files", "val_files",
                                       "tokenizer_path"}
SUMMARY_KEYS = ("seed", "code_sha256", "code_bytes", "model_bytes", "total_bytes", "steps",
                "train_ms", "gptq_ms", "train_total_ms", "scores", "score_line", "val_loss",
                "val_bpb", "eval_total_ms", "env", "settings", "curve")
INT_KEYS = ("seed", "code_bytes", "model_bytes", "total_bytes", "steps", "train_ms", "gptq_ms",
            "train_total_ms", "eval_total_ms")
ENV_KEYS = ("torch", "gpu", "gpu_name", "gpu_count", "world_size", "tokenizer_sha256",
            "data_fingerprint")
DEFAULTS = {f.name: f.default for _, f in Hyperparameters.declared()}  # every setting, with its type
# torch.cuda.get_device_name -> upstream's hardware wording
GPU_NAMES = {"NVIDIA H100 80GB HBM3": "H100 80GB SXM", "NVIDIA H100 PCIe": "H100 80GB PCIe",
             "NVIDIA H200": "H200 141GB SXM"}


class RecordError(RuntimeError):
    """A record folder cannot be assembled from the given logs."""


# --------------------------------------------------------------------------- reading logs

def split_runs(text: str) -> list[str]:
    """One segment per run: a log holds several when a RUN_ID is reused (train_gpt.py appends);
    each run starts with a ``run_id: `` line, and text before the first one joins the first."""
    lines = split_lines(text)
    starts = [i for i, l in enumerate(lines) if l.startswith("run_id: ")][1:]
    return ["".join(lines[a:b]) for a, b in zip([0] + starts, starts + [len(lines)])]


def parse_hparams(text: str) -> dict | None:
    """The ``Hyperparameters:`` block (``  name: value`` lines, values as logged), or None."""
    lines = [l.rstrip("\r") for l in text.split("\n")]
    if "Hyperparameters:" not in lines:
        return None
    hp = {}
    for l in lines[lines.index("Hyperparameters:") + 1:]:
        name, sep, value = l[2:].partition(":")
        if not (l.startswith("  ") and sep and name.isidentifier()):
            break
        hp[name] = value.strip()
    return hp


def parse_summary(text: str) -> dict | None:
    """The run's last ``summary: {json}`` line as a dict (non-finite numbers: NaN), or None."""
    for line in reversed(text.split("\n")):
        if line.startswith("summary: {"):
            try:
                d = json.loads(line[len("summary: "):])
            except ValueError as e:
                raise RecordError(f"summary line is not JSON: {e}") from None
            if not isinstance(d, dict):
                raise RecordError("summary line is not a JSON object")
            return d
    return None


def read_log(text: str, where: str = "log") -> dict:
    """The one training run of a log: {"summary", "hparams", "ignored_runs"}."""
    try:
        segs = [(parse_summary(s), s) for s in split_runs(text)]
        train = [(d, s) for d, s in segs if d is not None and d.get("mode") == "train"]
        if len(train) > 1:
            ids = ", ".join(str(d.get("run_id")) for d, _ in train)
            raise RecordError(f"holds {len(train)} training runs (run_id {ids}); "
                              "give one training run per log")
        if not train:
            modes = sorted({str(d.get("mode")) for d, _ in segs if d is not None})
            raise RecordError("no 'summary:' line of a training run (mode \"train\")"
                              + (f"; it has only {', '.join(modes)} runs" if modes else
                                 "; did the run finish?"))
        summary, seg = train[0]
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        missing += [f"env.{k}" for k in ENV_KEYS if k not in (summary.get("env") or {})]
        if missing:
            raise RecordError(f"summary line lacks {', '.join(missing)}")
        not_int = [k for k in INT_KEYS if type(summary[k]) is not int]
        if not_int:
            raise RecordError(f"summary {', '.join(not_int)} must be integers")
        not_dict = [k for k in ("env", "settings", "scores") if not isinstance(summary[k], dict)]
        if not_dict:
            raise RecordError(f"summary {', '.join(not_dict)} must be JSON objects")
        hp = parse_hparams(seg)
        if hp is None:
            raise RecordError("missing required 'Hyperparameters:' block")
        if hp.get("seed") != str(summary["seed"]):
            raise RecordError(f"Hyperparameters seed {hp.get('seed')} != summary seed {summary['seed']}")
        for k in ("val_bpb", "val_loss"):
            v = summary[k]
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise RecordError(f"{summary['score_line']} {k} is {v} (not finite: the run diverged)")
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None
    return {"summary": summary, "hparams": hp, "ignored_runs": len(segs) - 1}


# --------------------------------------------------------------------------- statistics

def mean_std(xs) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def welch_ttest_less(a, b) -> dict:
    """Welch's t-test, one-sided H1: mean(a) < mean(b) (None where undefined)."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return {"welch_t": None, "welch_df": None, "p_value": None}
    with warnings.catch_warnings():  # zero variance: nan, reported as None
        warnings.simplefilter("ignore", RuntimeWarning)
        r = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    out = {"welch_t": float(r.statistic), "welch_df": float(getattr(r, "df", math.nan)),
           "p_value": float(r.pvalue)}
    return {k: v if math.isfinite(v) else None for k, v in out.items()}


# --------------------------------------------------------------------------- description

def hardware_name(env: dict) -> str:
    """Upstream's wording, e.g. "8xH100 80GB SXM"; unknown GPUs "{count}x{name}"."""
    name, count = env.get("gpu_name"), env.get("gpu_count")
    if not name or not count:
        return str(env.get("gpu"))
    return f"{count}x{GPU_NAMES.get(name, name)}"


def _hp_value(hp: dict, name: str):
    """A logged setting parsed with its declared type (train_gpt's parser); None if absent or unparsable."""
    if name not in hp or name not in DEFAULTS:
        return None
    try:
        return parse_setting(name, hp[name], DEFAULTS[name])
    except ConfigError:
        return None


def technique_summary(hp: dict) -> str:
    """One line from the Hyperparameters block."""
    g = lambda k: _hp_value(hp, k)  # noqa: E731
    parts = []
    if g("vocab_size"):
        parts.append(f"SP{g('vocab_size')}")
    if g("num_layers") and g("model_dim"):
        parts.append(f"{g('num_layers')}x{g('model_dim')} transformer"
                     + (f" (MLP {g('mlp_mult'):g}x)" if g("mlp_mult") else ""))
    if hp.get("recur_layers"):  # layer lists as logged, e.g. 4,5
        passes = g("recur_passes") or 2
        parts.append(f"depth recurrence on layers {hp['recur_layers']}" + (f" ({passes} passes)" if passes != 2 else ""))
    if g("smear_gate"):
        parts.append("SmearGate")
    if g("attn_out_gate") not in (None, "0"):
        parts.append(f"{g('attn_out_gate')} attention output gate")
    if g("muon_ns") == "polar":
        parts.append("Polar Express Newton-Schulz")
    if (g("parallel_start_layer") or 0) > 0:
        parts.append(f"parallel residual lanes from layer {g('parallel_start_layer')}")
    if g("ve_enabled") and hp.get("ve_layers"):
        parts.append(f"value embeddings on layers {hp['ve_layers']}")
    if g("gptq_enabled") is not None:
        parts.append(("full-Hessian GPTQ int6" if g("gptq_enabled") else "int6") + " + brotli")
    if g("sliding_window_enabled"):
        parts.append(f"sliding-window eval stride {g('eval_stride')}")
    if g("ttt_enabled") and g("ttt_mode") == "lora":
        parts.append(f"score-first document-wise LoRA TTT (rank {g('ttt_lora_rank')}, {g('ttt_phases')} phases)")
    elif g("ttt_enabled"):
        parts.append("score-first TTT")
    if g("slot_enabled"):
        parts.append("SLOT")
    return ", ".join(parts)


def _env_assignment(name: str, value) -> str:
    return f"{name.upper()}={shlex.quote(env_text(value))}"  # layer lists arrive as JSON lists


def reproduce_lines(runs: list[dict]) -> list[str]:
    s0 = runs[0]["summary"]
    vocab = _hp_value(runs[0]["hparams"], "vocab_size") or DEFAULTS["vocab_size"]
    prep = f"python data/prepare.py download --variant sp{vocab}"
    if s0["env"].get("train_shards"):
        prep += f" --train-shards {s0['env']['train_shards']}"
    common = [_env_assignment(k, v) for k, v in sorted(s0["settings"].items())
              if k not in NOT_REPRODUCED]
    launch = f"torchrun --standalone --nproc_per_node={s0['env']['world_size']} train_gpt.py"
    return [prep] + [" ".join([f"SEED={r['summary']['seed']}"] + common + [launch]) for r in runs]


def _fmt(x, spec=".8f"):
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, spec)


def render_readme(sub: dict, runs: list[dict]) -> str:
    n, std = len(runs), sub["val_bpb_std"]
    L = [f"# {sub['name']}\n",
         f"**val_bpb {sub['val_bpb']:.8f}** (mean of {n} seed{'s' * (n != 1)}"
         + (f", sample std {std:.8f}" if std is not None else "") + ")  ",
         f"Author: {sub['author']} (@{sub['github_id']})  \nDate: {sub['date']}  \n"
         f"Track: {sub['track']}  \nHardware: {sub['hardware']}\n",
         f"{sub['blurb']}\n", f"Technique: {sub['technique_summary']}\n", "## Results\n",
         "| seed | steps | val_loss | val_bpb | pre-quant val_bpb | artifact bytes |",
         "|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        L.append(f"| {s['seed']} | {s['steps']} | {s['val_loss']:.8f} | {s['val_bpb']:.8f} | "
                 f"{_fmt((s.get('pre_quant') or {}).get('val_bpb'))} | {r['artifact_bytes']:,} |")
    L.append(f"| **mean** | | {sub['val_loss']:.8f} | **{sub['val_bpb']:.8f}** | | |\n")
    L.append(f"The score is each log's `{sub['score_line']}` (its `summary:` line); other "
             "evaluations are kept in `submission.json` under `seed_results`.\n")
    if "comparison_baseline_pr" in sub:
        pr = sub["comparison_baseline_pr"]
        L.append("## Comparison with the baseline\n")
        L.append(f"PR #{pr}: val_bpb {', '.join(f'{x:.8f}' for x in sub['baseline_val_bpb'])} "
                 f"(mean {sub['baseline_val_bpb_mean']:.8f}); delta "
                 f"{sub[f'delta_vs_pr{pr}_bpb']:+.5f} BPB.")
        if sub["welch_t"] is not None:
            L.append(f"Welch's t = {sub['welch_t']:.4f}, df = {sub['welch_df']:.2f}, one-sided "
                     f"p = {sub['p_value']:.3g} (H1: our mean val_bpb is lower).\n")
        else:
            L.append("Welch's test: not computed (needs two runs on each side and non-zero "
                     "variance).\n")
    L += ["## Reproduce\n", "```bash"] + reproduce_lines(runs) + ["```\n"]
    L += compliance_lines(sub, runs)
    L.append("## Files\n")
    L.append(f"- `train_gpt.py`: the submitted code, {sub['bytes_code']:,} bytes (a self-extracting "
             f"LZMA2+base85 wrapper; run it directly); the logs' code_sha256 `{sub['code_sha256']}`")
    L += [f"- `{r['log_name']}`: log of seed {r['summary']['seed']}" for r in runs]
    L.append("- `submission.json`; `train_curves.png` (train loss and val BPB against training time)")
    return "\n".join(L) + "\n"


def compliance_lines(sub: dict, runs: list[dict]) -> list[str]:
    s0, hp = runs[0]["summary"], runs[0]["hparams"]
    vocab, stride = _hp_value(hp, "vocab_size"), _hp_value(hp, "eval_stride")
    sliding = "sliding" in s0["score_line"]
    L = ["## Compliance\n",
         "- **Causal evaluation:** every target is predicted from the tokens before it only (causal "
         "attention; the test suite checks that changing tokens at positions >= p leaves every "
         "NLL of targets < p unchanged).",
         f"- **Full normalized distribution:** each NLL is the cross-entropy of a softmax over all "
         f"{vocab} tokens; BPB divides the summed NLL (in bits) by the validation set's UTF-8 bytes.",
         "- **Single left-to-right pass:** " + (
             f"windows advance by {stride} tokens and every target is scored exactly once, by "
             "the first window that reaches it." if sliding else
             "non-overlapping windows, every target scored exactly once.")]
    scores = set(s0["scores"])
    if any("ttt" in k for k in scores) and _hp_value(hp, "ttt_mode") == "lora":
        L.append("- **Score before update (document-wise LoRA TTT):** each document is scored on its own "
                 "tokens only, chunk by chunk; a chunk's NLL comes before the step that trains that document's "
                 "adapters on it, adapters restart for every document, and the phases' whole-model SGD trains "
                 "only on documents already scored.")
    elif any("ttt" in k for k in scores):
        L.append("- **Score before update (TTT):** each chunk is scored under `no_grad` with the "
                 "weights adapted on earlier chunks only, then trained on.")
    if any("slot" in k for k in scores):
        L.append("- **Score before update (SLOT):** each window's delta is fitted only to its "
                 "already-scored context positions, never shared between windows (a non-record "
                 "eval-time optimization).")
    if not any("ttt" in k or "slot" in k for k in scores):
        L.append("- **No test-time updates:** the weights are fixed during evaluation.")
    L += ["", "| seed | artifact bytes (limit 16,000,000) | training ms: train + gptq (limit "
          "600,000) | eval ms (limit 600,000) |", "|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        L.append(f"| {s['seed']} | {r['artifact_bytes']:,} | {s['train_ms']:,} + {s['gptq_ms']:,}"
                 f" = {s['train_total_ms']:,} | {s['eval_total_ms']:,} |")
    return L + [""]


def plot_curves(runs: list[dict]) -> bytes:
    """PNG: train loss and val BPB against training time (minutes), one line per seed."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ok = lambda p: all(isinstance(x, (int, float)) and math.isfinite(x) for x in p[:3])  # noqa: E731
    for r in runs:
        c, seed = r["summary"]["curve"] or {}, r["summary"]["seed"]
        tr = [p for p in c.get("train") or [] if ok(p)]
        ax1.plot([p[1] / 60000 for p in tr], [p[2] for p in tr], marker=".", label=f"seed {seed}")
        va = [p for p in c.get("val") or [] if ok(p) and ok(p[1:])]
        va = [p for p in va if p[0] > 0] or va  # step 0 (~log V) hides the rest
        ax2.plot([p[1] / 60000 for p in va], [p[3] for p in va], marker="o", label=f"seed {seed}")
    ax1.set(xlabel="training time (min)", ylabel="train loss (nats/token)", title="train loss")
    ax2.set(xlabel="training time (min)", ylabel="val BPB", title="validation BPB (step > 0)")
    ax1.set_yscale("log")  # the early loss spike would flatten the rest
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax1.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- checks

def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "record"


def _is_previous_record(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and \
        os.path.isfile(os.path.join(path, "submission.json"))


def check_out_dir(out: str, script: str, logs: list[str], force: bool) -> None:
    """Refuse an output folder whose replacement could destroy anything but a previous record."""
    real = os.path.realpath(out)
    for what, p in [("the current directory", os.curdir), ("--script", script)] + \
            [("log", l) for l in logs]:
        if os.path.commonpath([real, os.path.realpath(p)]) == real:
            raise RecordError(f"--out {out} is or contains {what} {os.path.abspath(p)}")
    if not os.path.lexists(out):
        return
    if os.path.islink(out):
        raise RecordError(f"--out {out} is a symbolic link")
    if not os.path.isdir(out):
        raise RecordError(f"--out {out} exists and is not a folder")
    if not os.listdir(out):
        return
    if not force:
        raise RecordError(f"{out} exists and is not empty (use --force to replace a previous "
                          "record folder)")
    if not _is_previous_record(out):
        raise RecordError(f"{out} is not empty and holds no submission.json, so it is not a "
                          "previous record; --force only replaces record folders")


def _replace_dir(new: str, out: str) -> None:
    """Move folder ``new`` to ``out``; an existing ``out`` is renamed aside first and deleted
    only once ``new`` is in place (restored if that fails).  Both share a parent."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    aside_dir = tempfile.mkdtemp(prefix=".record-old-", dir=os.path.dirname(os.path.abspath(out)))
    aside = os.path.join(aside_dir, "old")
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        os.rmdir(aside_dir)
        raise
    shutil.rmtree(aside_dir, ignore_errors=True)


def check_runs(runs: list[dict], accepted: dict, wrapper_bytes: int) -> None:
    """Per-log limits and cross-log consistency; raises :class:`RecordError`."""
    S = [r["summary"] for r in runs]
    shas = {s["code_sha256"] for s in S}
    if len(shas) > 1:
        raise RecordError("logs ran different code: " + ", ".join(
            f"{r['path']}={r['summary']['code_sha256'][:12]}" for r in runs))
    h = shas.pop()
    if h not in accepted:
        raise RecordError(f"log code_sha256 {str(h)[:12]}... matches neither the script, its "
                          "source nor its wrapper")
    seeds = [s["seed"] for s in S]
    dups = sorted({x for x in seeds if seeds.count(x) > 1})
    if dups:
        raise RecordError(f"duplicate seeds: {dups}")
    for r, s in zip(runs, S):
        p = r["path"]
        if s["code_bytes"] != accepted[h]:
            raise RecordError(f"{p}: code_bytes {s['code_bytes']} does not match the "
                              f"{accepted[h]} bytes of the file with that sha256")
        if s["total_bytes"] > MAX_ARTIFACT_BYTES:
            raise RecordError(f"{p}: artifact {s['total_bytes']:,} bytes exceeds {MAX_ARTIFACT_BYTES:,}")
        r["artifact_bytes"] = s["model_bytes"] + wrapper_bytes
        if r["artifact_bytes"] > MAX_ARTIFACT_BYTES:
            raise RecordError(f"{p}: model {s['model_bytes']:,} + wrapper {wrapper_bytes:,} bytes "
                              f"exceeds {MAX_ARTIFACT_BYTES:,}")
        if max(s["train_total_ms"], s["train_ms"]) > MAX_TRAIN_MS:
            raise RecordError(f"{p}: training took {s['train_total_ms']} ms (train {s['train_ms']}"
                              f" + gptq {s['gptq_ms']}), over {MAX_TRAIN_MS}")
        if s["eval_total_ms"] > MAX_EVAL_MS:
            raise RecordError(f"{p}: eval_total {s['eval_total_ms']} ms exceeds the evaluation "
                              f"limit of {MAX_EVAL_MS} ms")
    for key in ("tokenizer_sha256", "data_fingerprint"):
        if len({s["env"][key] for s in S}) > 1:
            raise RecordError(f"logs disagree on {key}: " + ", ".join(
                f"{r['path']}={str(r['summary']['env'][key])[:16]}..." for r in runs))
    ref = runs[0]["hparams"]
    differ = sorted({k for r in runs[1:] for k in set(ref) | set(r["hparams"])
                     if k not in HPARAMS_MAY_DIFFER and ref.get(k) != r["hparams"].get(k)})
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"{r['path']}={r['hparams'].get(k, '<missing>')}"
                                                  for r in runs) for k in differ)
        raise RecordError(f"logs differ in hyperparameters {', '.join(differ)} ({detail})")
    shared = [{k: v for k, v in s["settings"].items() if k not in NOT_REPRODUCED} for s in S]
    if any(x != shared[0] for x in shared):
        raise RecordError("logs differ in their summary settings: "
                          + ", ".join(f"{r['path']}={x}" for r, x in zip(runs, shared)))
    if len({s["score_line"] for s in S}) > 1:
        raise RecordError("seeds are scored by different lines (all must use the same one): "
                          + ", ".join(f"{r['path']}={r['summary']['score_line']}" for r in runs))


def _common(runs, get, what):
    """The runs' shared value (None if none has one); several are joined, with a warning."""
    vals = sorted({str(get(r)) for r in runs if get(r) is not None})
    if len(vals) > 1:
        print(f"warning: logs disagree on {what}: {vals}", file=sys.stderr)
    return ", ".join(vals) or None


# --------------------------------------------------------------------------- assembly

def check_arguments(logs, name, author, github_id, blurb, baseline_pr, baseline_bpb, date):
    if not logs:
        raise RecordError("no logs given")
    for what, v in (("github id", github_id), ("author", author), ("name", name), ("blurb", blurb)):
        if not (isinstance(v, str) and v.strip()):
            raise RecordError(f"a {what} is required")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise RecordError(f"date must be YYYY-MM-DD, got {date!r}")
    if (baseline_pr is None) != (not baseline_bpb):
        raise RecordError("give both --baseline-pr and --baseline-bpb, or neither")
    if baseline_bpb and not all(math.isfinite(float(x)) for x in baseline_bpb):
        raise RecordError(f"baseline val_bpb values must be finite: {baseline_bpb}")


def load_script(script: str, strip: bool) -> tuple[bytes, dict]:
    """(the wrapper to ship, {sha256: bytes} of the files a log may have run: script, wrapper, source).
    An already-built wrapper is shipped verbatim."""
    script_bytes = Path(script).read_bytes()
    script_text = script_bytes.decode("utf-8-sig")
    try:
        source, wrapper = extract_source(script_text), script_text
        print(f"{script} is already a wrapper; shipping it as is")
    except WrapperError:
        source, wrapper = script_text, make_wrapper(script_text, strip=strip)
    wrapper_bytes = wrapper.encode("utf-8")
    return wrapper_bytes, {_sha256(b): len(b) for b in (script_bytes, wrapper_bytes, source.encode("utf-8"))}


def submission(runs: list[dict], meta: dict, code_bytes: int, baseline_pr, baseline_bpb) -> dict:
    """submission.json: upstream's keys and rounding first, then ours."""
    S = [r["summary"] for r in runs]
    bpbs, losses = [s["val_bpb"] for s in S], [s["val_loss"] for s in S]
    m_bpb, s_bpb = mean_std(bpbs)
    sub = {k: meta[k] for k in ("author", "github_id", "name", "date", "track")}
    sub.update({"val_bpb": round(m_bpb, 8), "val_bpb_std": None if s_bpb is None else round(s_bpb, 8),
                "seeds": [s["seed"] for s in S], "seed_results": {}})
    if baseline_bpb:
        delta = m_bpb - statistics.fmean(baseline_bpb)
        sub["comparison_baseline_pr"] = baseline_pr
        sub[f"delta_vs_pr{baseline_pr}_bpb"] = round(delta, 5)
    sub.update({
        "hardware": meta["hardware"] or _common(runs, lambda r: hardware_name(r["summary"]["env"]), "hardware"),
        "pytorch_version": _common(runs, lambda r: r["summary"]["env"]["torch"], "torch"),
        "technique_summary": meta["technique"] or technique_summary(runs[0]["hparams"]),
        "blurb": meta["blurb"],
        # not in upstream's submission.json:
        "val_loss": round(statistics.fmean(losses), 8),
        "score_line": S[0]["score_line"],
        "bytes_total": max(r["artifact_bytes"] for r in runs),
        "bytes_code": code_bytes,
        "code_sha256": S[0]["code_sha256"],
        "python_version": _common(runs, lambda r: r["summary"]["env"].get("python"), "python"),
        "cuda_version": _common(runs, lambda r: r["summary"]["env"].get("cuda"), "cuda"),
    })
    if baseline_bpb:
        sub["baseline_val_bpb"] = baseline_bpb
        sub["baseline_val_bpb_mean"] = statistics.fmean(baseline_bpb)
        sub["delta_bpb"] = delta
        sub.update(welch_ttest_less(bpbs, baseline_bpb))
    for r, s in zip(runs, S):
        sub["seed_results"][str(s["seed"])] = {
            "val_bpb": round(s["val_bpb"], 8), "artifact_bytes": r["artifact_bytes"],
            "val_loss": s["val_loss"],
            "logged_total_bytes": s["total_bytes"], "model_bytes": s["model_bytes"],
            "steps": s["steps"], "stopped_early": s.get("stopped_early"),
            "train_ms": s["train_ms"], "gptq_ms": s["gptq_ms"],
            "train_total_ms": s["train_total_ms"], "eval_total_ms": s["eval_total_ms"],
            "pre_quant": s.get("pre_quant"), "scores": s["scores"],
            "peak_memory_mib": s.get("peak_memory_mib"), "run_id": s.get("run_id"), "env": s["env"]}
    bad: list[str] = []
    sub = finite_or_null(sub, bad=bad)  # e.g. a diverged TTT score
    if bad:
        print(f"warning: non-finite values written as null: {', '.join(bad)}", file=sys.stderr)
    return sub


def write_folder(out: str, files: dict, recheck) -> None:
    """All files into a temporary folder beside `out`, then renamed into place (recheck() first)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".record-", dir=parent)
    try:
        for fname, data in files.items():
            write_atomic(Path(tmp) / fname, data)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        recheck()
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def assemble_record(logs: list[str], name: str, author: str, github_id: str, blurb: str,
                    script: str = "train_gpt.py", baseline_pr: int | None = None,
                    baseline_bpb: list[float] | None = None, technique: str | None = None,
                    hardware: str | None = None, track: str = TRACK, out: str | None = None,
                    date: str | None = None, strip: bool = True,
                    force: bool = False) -> tuple[str, dict]:
    """Validate the logs and write a record folder; return (out_dir, submission dict).

    Every check runs before anything is written; the folder is built in a temporary folder
    and renamed into place, so a refusal leaves no files behind.
    """
    date = date or _dt.date.today().isoformat()
    check_arguments(logs, name, author, github_id, blurb, baseline_pr, baseline_bpb, date)
    out = out or os.path.join("records", f"{date}_{_slug(name)}")
    check_out_dir(out, script, logs, force)
    baseline_bpb = [float(x) for x in baseline_bpb] if baseline_bpb else None
    baseline_pr = int(baseline_pr) if baseline_bpb else None
    wrapper_bytes, accepted = load_script(script, strip)
    runs = []
    for path in logs:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            r = read_log(f.read(), where=path)
        r["path"] = path
        r["log_name"] = f"train_seed{r['summary']['seed']}.log"
        runs.append(r)
    check_runs(runs, accepted, len(wrapper_bytes))
    meta = dict(author=author, github_id=github_id, name=name, date=date, track=track, hardware=hardware,
                technique=technique, blurb=blurb)
    sub = submission(runs, meta, len(wrapper_bytes), baseline_pr, baseline_bpb)
    files = {"train_gpt.py": wrapper_bytes,
             "submission.json": (json.dumps(sub, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode(),
             "README.md": render_readme(sub, runs).encode("utf-8"),
             "train_curves.png": plot_curves(runs)}
    files.update((r["log_name"], Path(r["path"]).read_bytes()) for r in runs)
    write_folder(out, files, lambda: check_out_dir(out, script, logs, force))  # it may have changed meanwhile
    return out, sub


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make_record.py",
                                 description="Assemble a record folder from training logs.")
    ap.add_argument("--logs", nargs="+", required=True, help="one log per seed")
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", required=True, help="a paragraph describing the submission")
    ap.add_argument("--baseline-pr", type=int, help="PR number of the record compared against")
    ap.add_argument("--baseline-bpb", help="comma-separated per-seed val_bpb of that record")
    ap.add_argument("--technique-summary", help="default: generated from the hyperparameters")
    ap.add_argument("--hardware", help="default: from the logs, e.g. '8xH100 80GB SXM'")
    ap.add_argument("--script", default="train_gpt.py",
                    help="trainer source, or an already-built wrapper (shipped verbatim)")
    ap.add_argument("--no-strip", action="store_true", help="wrap the source unstripped")
    ap.add_argument("--track", default=TRACK)
    ap.add_argument("--date", help="YYYY-MM-DD (default: today)")
    ap.add_argument("--out", help="output folder (default records/<date>_<name>)")
    ap.add_argument("--force", action="store_true", help="replace a previous record folder")
    a = ap.parse_args(argv)
    try:
        base = None
        if a.baseline_bpb is not None:
            try:
                base = [float(x) for x in a.baseline_bpb.split(",") if x.strip()]
            except ValueError:
                raise RecordError(f"--baseline-bpb must be numbers: {a.baseline_bpb!r}") from None
            if not base:
                raise RecordError(f"--baseline-bpb must be numbers: {a.baseline_bpb!r}")
        out, sub = assemble_record(
            a.logs, a.name, a.author, a.github_id, a.blurb, script=a.script,
            baseline_pr=a.baseline_pr, baseline_bpb=base, technique=a.technique_summary,
            hardware=a.hardware, track=a.track, out=a.out, date=a.date, strip=not a.no_strip,
            force=a.force)
    except (OSError, UnicodeDecodeError, RecordError, WrapperError) as e:
        print(f"make_record: error: {e}; nothing written", file=sys.stderr)
        return 1
    std = sub["val_bpb_std"]
    print(f"wrote {out}: val_bpb {sub['val_bpb']:.8f}"
          + (f" (std {std:.8f})" if std is not None else "")
          + f", seeds {sub['seeds']}, bytes_total {sub['bytes_total']:,}, code {sub['bytes_code']:,}")
    if "comparison_baseline_pr" in sub:
        pr = sub["comparison_baseline_pr"]
        print(f"delta_vs_pr{pr}_bpb {sub[f'delta_vs_pr{pr}_bpb']:+.5f}, welch_t {sub['welch_t']}, "
              f"p {sub['p_value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
