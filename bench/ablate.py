"""Paired ablations: a base command and named variants (each a set of env settings), every variant run with each of
K seeds. The same SEED means the same init and the same data order, so variant - base differences are paired.

    python bench/ablate.py --out runs/ablate --seeds 1,2,3 --set ITERATIONS=200 --set MAX_WALLCLOCK_SECONDS=0 \\
        --variant polar MUON_NS=polar --variant smear SMEAR_GATE=1 --variant all MUON_NS=polar SMEAR_GATE=1
    python bench/ablate.py ... --cmd "torchrun --standalone --nproc_per_node=8 train_gpt.py"     # on GPUs

Per variant: the mean paired delta against `base` (always run) and its standard error over seeds for the
pre-quantization, int6 roundtrip and sliding-window BPB (and TTT / SLOT where on), plus steps, training tok/s,
parameters and artifact bytes. Writes OUT/ablation.md and OUT/ablation.json and prints the table.

Each run gets OUT/runs/<variant>_s<seed>/ as OUT_DIR (its log: logs/<variant>_s<seed>.txt, its output:
output.txt) and RUN_ID <variant>_s<seed>. Only the run's last line, `summary: {json}`, is read. Resuming: a run
whose log already ends with a summary, run by the same command and settings (run.json), is not run again; a run
cut short is run again from the start; one run at a time unless --jobs says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402  (no side effects on import)

# summary score -> column; TTT and SLOT columns appear only when some run has them
METRICS = (("pre_quant", "pre-quant"), ("final_int6_roundtrip", "roundtrip"),
           ("final_int6_sliding_window", "sliding"), ("final_int6_ttt", "TTT"), ("final_int6_slot", "SLOT"))


def parse_assignments(items, what: str) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or key != key.upper():
            raise SystemExit(f"ablate.py: error: {what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def read_summary(log: Path) -> dict | None:
    """The summary of a completed run: the log's last line, or None."""
    if not log.is_file():
        return None
    lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    if not lines or not lines[-1].startswith("summary: "):
        return None
    return json.loads(lines[-1][len("summary: "):])


def metrics(summary: dict) -> dict:
    """BPB by metric key, steps, tok/s, parameters and artifact bytes of one run."""
    scores = {k: v["val_bpb"] for k, v in summary["scores"].items()}
    if summary.get("pre_quant"):
        scores["pre_quant"] = summary["pre_quant"]["val_bpb"]
    batch = summary["settings"].get("train_batch_tokens", train_gpt.Hyperparameters.train_batch_tokens)
    train_s = (summary.get("train_ms") or 0) / 1000
    return dict(bpb={k: v for k, v in scores.items() if v is not None}, steps=summary["steps"],
                tok_s=summary["steps"] * batch / train_s if train_s else None,
                params=summary.get("model_params"), total_bytes=summary["total_bytes"])


def mean_se(xs: list) -> dict:
    """Mean, standard error of the mean (None for one value) and n."""
    n = len(xs)
    if not n:
        return dict(mean=None, se=None, n=0)
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return dict(mean=m, se=se, n=n)


def aggregate(variants: dict, seeds: list, results: dict) -> dict:
    """variant -> its settings, per-seed metrics, paired deltas against base and mean run facts."""
    out = {}
    for name, settings in variants.items():
        runs = {s: results[(name, s)] for s in seeds if (name, s) in results}
        row = dict(settings=settings, runs=runs, bpb={}, delta={})
        for key, _ in METRICS:
            vals = [r["bpb"][key] for r in runs.values() if key in r["bpb"]]
            if vals:
                row["bpb"][key] = mean_se(vals)
            pairs = [r["bpb"][key] - results[("base", s)]["bpb"][key] for s, r in runs.items()
                     if key in r["bpb"] and ("base", s) in results and key in results[("base", s)]["bpb"]]
            if pairs and name != "base":
                row["delta"][key] = mean_se(pairs)
        for k in ("steps", "tok_s", "params", "total_bytes"):
            vals = [r[k] for r in runs.values() if r[k] is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        out[name] = row
    return out


def fmt(x: dict | None, digits: int = 4) -> str:
    if not x or x["mean"] is None:
        return "n/a"
    return f"{x['mean']:+.{digits}f} ± {x['se']:.{digits}f}" if x["se"] is not None else f"{x['mean']:+.{digits}f}"


def markdown(table: dict, seeds: list) -> str:
    keys = [(k, label) for k, label in METRICS if any(k in row["bpb"] for row in table.values())]
    head = ["variant", "settings"] + [f"Δ {label} BPB" for _, label in keys] + ["steps", "tok/s", "params",
                                                                                 "artifact bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        if name == "base":  # absolute values: mean ± SE over seeds
            cells = [f"{row['bpb'][k]['mean']:.4f}" + (f" ± {row['bpb'][k]['se']:.4f}" if row['bpb'][k]['se'] else "")
                     if k in row["bpb"] else "n/a" for k, _ in keys]
        else:
            cells = [fmt(row["delta"].get(k)) for k, _ in keys]
        num = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        settings = " ".join(f"{k}={v}" for k, v in row["settings"].items()) or "(base)"
        lines.append("| " + " | ".join([name, settings] + cells + [num(row["steps"], ".0f"), num(row["tok_s"], ",.0f"),
                                                                     num(row["params"], ",.0f"),
                                                                     num(row["total_bytes"], ",.0f")]) + " |")
    n = len(seeds)
    return "\n".join(lines) + (f"\n\nBase row: BPB (mean ± SE over {n} seeds). Other rows: variant − base, the mean "
                               f"paired difference over seeds {','.join(map(str, seeds))} ± its standard error "
                               "(negative is better). steps, tok/s, params, bytes: means.\n")


class Runner:
    def __init__(self, out: Path, cmd: list, base_env: dict, variants: dict, seeds: list, jobs: int, report: bool):
        self.out, self.cmd, self.base_env, self.variants, self.seeds = out, cmd, base_env, variants, seeds
        self.jobs, self.report = jobs, report
        self.results, self.failed, self.times, self.t0 = {}, [], [], time.time()
        self.todo = [(v, s) for s in seeds for v in variants]  # seed-major: early pairs are complete

    def paths(self, name: str, seed: int) -> tuple:
        run_id = f"{name}_s{seed}"
        folder = self.out / "runs" / run_id
        return run_id, folder, folder / "logs" / f"{run_id}.txt"

    def spec(self, name: str, seed: int) -> dict:
        run_id, folder, _ = self.paths(name, seed)
        env = {**self.base_env, **self.variants[name], "SEED": str(seed), "RUN_ID": run_id, "OUT_DIR": str(folder)}
        return dict(cmd=self.cmd, env=env)

    def say(self, msg: str):
        print(f"[ablate {time.time() - self.t0:7.0f}s] {msg}", flush=True)

    def run_one(self, i: int, name: str, seed: int):
        run_id, folder, log = self.paths(name, seed)
        spec, spec_file = self.spec(name, seed), folder / "run.json"
        summary = read_summary(log)
        if summary is not None:
            if not spec_file.is_file() or json.loads(spec_file.read_text()) != spec:
                raise SystemExit(f"ablate.py: error: {folder} holds a finished run of another command or settings; "
                                 "use another --out")
            self.results[(name, seed)] = metrics(summary)
            self.say(f"[{i}/{len(self.todo)}] {run_id}: done earlier, not run again")
            return
        if self.report:
            self.say(f"[{i}/{len(self.todo)}] {run_id}: not finished, left out (--report)")
            return
        folder.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)  # a run cut short starts again from nothing
        spec_file.write_text(json.dumps(spec, indent=1))
        eta = ""
        if self.times:
            left = sum(1 for v, s in self.todo if (v, s) not in self.results) / self.jobs
            eta = f", about {left * sum(self.times) / len(self.times) / 60:.0f} min left"
        self.say(f"[{i}/{len(self.todo)}] {run_id}: running ({len(self.results)} done{eta})")
        t0 = time.time()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        with open(folder / "output.txt", "w", encoding="utf-8") as f:
            rc = subprocess.run(self.cmd, env={**env, **spec["env"]}, cwd=str(ROOT), stdout=f,
                                stderr=subprocess.STDOUT).returncode
        self.times.append(time.time() - t0)
        summary = read_summary(log)
        if rc != 0 or summary is None:
            self.failed.append(run_id)
            self.say(f"[{i}/{len(self.todo)}] {run_id}: FAILED (exit {rc}); see {folder / 'output.txt'}")
            return
        m = self.results[(name, seed)] = metrics(summary)
        base = self.results.get(("base", seed))
        key = "final_int6_sliding_window" if "final_int6_sliding_window" in m["bpb"] else "final_int6_roundtrip"
        vs = f" ({m['bpb'][key] - base['bpb'][key]:+.4f} vs base)" if base and name != "base" else ""
        self.say(f"[{i}/{len(self.todo)}] {run_id}: {self.times[-1]:.0f}s, {key} {m['bpb'][key]:.4f}{vs}")

    def run(self):
        with ThreadPoolExecutor(self.jobs) as ex:
            for f in [ex.submit(self.run_one, i + 1, v, s) for i, (v, s) in enumerate(self.todo)]:
                f.result()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for the runs and the tables")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--cmd", default=f"{shlex.quote(sys.executable)} train_gpt.py",
                    help="the command that trains one run, from the repository root (default: python train_gpt.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of every run")
    ap.add_argument("--variant", action="append", nargs="+", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a named variant: its settings on top of the base's (repeat for more variants)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--report", action="store_true", help="run nothing: the tables from the runs finished so far")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = {"base": {}}
    for name, *sets in a.variant:
        if name in variants or not name.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"ablate.py: error: variant name {name!r} is repeated or not a plain name")
        variants[name] = parse_assignments(sets, f"variant {name}:")
    base_env = parse_assignments(a.set, "--set")
    if {"SEED", "RUN_ID", "OUT_DIR"} & (set(base_env) | {k for v in variants.values() for k in v}):
        raise SystemExit("ablate.py: error: SEED, RUN_ID and OUT_DIR are set by --seeds and --out")
    if not seeds or len(set(seeds)) != len(seeds) or a.jobs < 1:
        raise SystemExit("ablate.py: error: --seeds must list distinct seeds, and --jobs must be at least 1")
    a.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(a.out.resolve(), shlex.split(a.cmd), base_env, variants, seeds, a.jobs, a.report)
    runner.say(f"{len(variants)} variants x {len(seeds)} seeds = {len(runner.todo)} runs of: {a.cmd}")
    runner.run()
    table = aggregate(variants, seeds, runner.results)
    md = markdown(table, seeds)
    (a.out / "ablation.md").write_text(md, encoding="utf-8")
    (a.out / "ablation.json").write_text(json.dumps(dict(
        command=a.cmd, settings=runner.base_env, seeds=seeds, failed=runner.failed,
        variants={n: {**row, "runs": {str(s): r for s, r in row["runs"].items()}} for n, row in table.items()}),
        indent=1), encoding="utf-8")
    print(md)
    if runner.failed:
        print(f"ablate.py: {len(runner.failed)} run(s) failed: {', '.join(runner.failed)}", file=sys.stderr)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
