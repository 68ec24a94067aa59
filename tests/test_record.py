"""Tests for make_record.py: record folders from the logs' ``summary:`` lines."""
from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_wrapper as bw  # noqa: E402
import make_record as mr  # noqa: E402

SCRIPT_SRC = "import os\n" + "\n".join(f"def f{i}():\n    return {i} * os.getpid()  # c{i}\n"
                                         for i in range(60))
TOK_SHA = "1f" * 32
DATA_FP = "2e" * 32
# non-default settings of the fixture's runs (the per-run ones are added per seed)
SETTINGS = {"num_layers": 12, "matrix_lr": 0.025, "ttt_enabled": True, "ve_layers": [8, 9, 10], "recur_layers": [],
            "compile": "1", "logit_softcap": 20.0, "sliding_window_enabled": True}


def hparams(seed, run_id, hp=None, eval_only=""):
    """The Hyperparameters block as train_gpt.py logs it; ``hp`` overrides (None drops a name)."""
    d = {"data_dir": "./data/", "train_files": "", "val_files": "", "tokenizer_path": "",
         "out_dir": f"./out_{run_id}", "run_id": run_id, "seed": seed, "vocab_size": 4096,
         "num_layers": 12, "model_dim": 512, "mlp_mult": 4.0, "recur_layers": "4,5",
         "parallel_start_layer": 7, "ve_enabled": True, "ve_layers": "8,9,10",
         "sliding_window_enabled": True, "eval_stride": 64, "gptq_enabled": True,
         "ttt_enabled": True, "slot_enabled": False, "matrix_lr": 0.025, "eval_only": eval_only,
         "dump_token_nll": "", "rank": 0, "world_size": 8, "local_rank": 0}
    d.update(hp or {})
    return ["Hyperparameters:"] + [f"  {k}: {v}" for k, v in d.items() if v is not None]


def summary(seed, bpb, loss, *, code_sha, code_bytes, model_bytes=15_960_000, train_ms=590_026,
            gptq_ms=9_500, sliding=True, ttt=False, ttt_bpb=1.336032, eval_total_ms=95_000,
            tok_sha=TOK_SHA, data_fp=DATA_FP, run_id=None, mode="train", settings=None, **kw):
    run_id = run_id or f"run_seed{seed}"
    scores = {"final_int6_roundtrip": {"val_loss": loss + 0.04, "val_bpb": bpb + 0.0186,
                                       "eval_ms": 7776}}
    if sliding:
        scores["final_int6_sliding_window"] = {"val_loss": loss, "val_bpb": bpb, "eval_ms": 76195}
    if ttt:
        scores["final_int6_ttt"] = {"val_loss": 3.07, "val_bpb": ttt_bpb, "eval_ms": 405410}
    line = "final_int6_sliding_window" if sliding else "final_int6_roundtrip"
    s = {"run_id": run_id, "mode": mode, "seed": seed, "code_sha256": code_sha,
         "code_bytes": code_bytes, "model_bytes": model_bytes, "total_bytes": model_bytes + code_bytes,
         "bytes_limit": 16_000_000, "steps": 5453, "stopped_early": True, "train_ms": train_ms,
         "gptq_ms": gptq_ms, "train_total_ms": train_ms + gptq_ms, "train_limit_ms": 600_000,
         "pre_quant": {"val_loss": loss + 0.016, "val_bpb": bpb + 0.007, "eval_ms": 2010},
         "scores": scores, "score_line": line, "val_loss": scores[line]["val_loss"],
         "val_bpb": scores[line]["val_bpb"], "eval_total_ms": eval_total_ms,
         "peak_memory_mib": {"allocated": 30120, "reserved": 30154},
         "env": {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0",
                 "gpu": "NVIDIA H100 80GB HBM3 x8", "gpu_name": "NVIDIA H100 80GB HBM3",
                 "gpu_count": 8, "world_size": 8, "attention_backend": "sdpa:cudnn",
                 "compile": True, "git_commit": "abc123", "tokenizer": "./data/tok.model",
                 "tokenizer_sha256": tok_sha, "data_fingerprint": data_fp, "train_shards": 80,
                 "val_shards": 1},
         "settings": {"seed": seed, "run_id": run_id, "data_dir": "/data", "out_dir": "/o",
                      **(SETTINGS if settings is None else settings)},
         "curve": {"train": [[1, 110.0, 8.31, 7.1e6], [2, 220.0, 12.1, 7.1e6],
                             [500, 50000.0, 3.12 + seed * 1e-5, 7.9e6], [4000, 398000.0, 2.7, 7.9e6]],
                   "val": [[0, 0.0, 8.32, 3.61], [4000, 398000.0, 2.6, 1.14],
                           [5453, float(train_ms), 2.53, bpb + 0.008]]}}
    s.update(kw)
    return s


def make_log(s: dict, hp=None, extra=True, eval_only="") -> str:
    L = ["W1124 torchrun: OMP_NUM_THREADS set to 1"] if extra else []
    L.append(f"run_id: {s['run_id']} started: 2026-11-24T10:00:00+00:00")
    L += ["env: python: 3.12.3", "env: gpu: NVIDIA H100 80GB HBM3 x8"]
    L += hparams(s["seed"], s["run_id"], hp, eval_only)
    L += ["train_shards: 80", "1/20000 train_loss: 8.3100 train_time: 0.00m tok/s: 7100000",
          "final_int6_sliding_window val_loss:9.99999999 val_bpb:9.99999999 eval_time:1ms",
          "summary: " + json.dumps(s)]
    if extra:
        L.append("[rank0]:[W1124 10:11:00] ProcessGroupNCCL destroyed")  # after the summary
    return "\n".join(L) + "\n"


def eval_only_log(seed, bpb, loss, *, code_sha, code_bytes, run_id="rescore", **kw):
    s = summary(seed, bpb, loss, code_sha=code_sha, code_bytes=code_bytes, run_id=run_id,
                mode="eval_only", **kw)
    s.update(steps=None, stopped_early=None, train_ms=None, gptq_ms=None, train_total_ms=None,
             pre_quant=None, peak_memory_mib=None)
    return make_log(s, extra=False, eval_only="./final_model.int6.ptz")


@pytest.fixture
def rec(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT_SRC)
    wrapper = bw.make_wrapper(SCRIPT_SRC)

    class R:
        pass
    r = R()
    r.tmp, r.script, r.wrapper = tmp_path, script, wrapper
    r.sha, r.size = hashlib.sha256(wrapper.encode()).hexdigest(), len(wrapper.encode())
    r.seeds = [42, 314, 999]
    r.bpbs = [1.08938974, 1.08982552, 1.08993367]
    r.losses = [2.50671564, 2.50771838, 2.50796723]
    r.base = [1.1147, 1.1151, 1.1144]  # mean: upstream's delta -0.02502

    def write_logs(overrides=None, seeds=None, hp=None):
        paths = []
        for i, (s, b, l) in enumerate(zip(seeds or r.seeds, r.bpbs, r.losses)):
            kw = dict(code_sha=r.sha, code_bytes=r.size, ttt=(i == 0))
            kw.update((overrides or {}).get(i, {}))
            p = tmp_path / f"log_{i}.txt"
            p.write_text(make_log(summary(s, b, l, **kw), hp=(hp or {}).get(i)))
            paths.append(str(p))
        return paths
    r.write_logs = write_logs
    r.out = tmp_path / "records" / "2026-11-24_test"

    def args(logs, *extra, baseline=True):
        return ["--logs", *logs, "--name", "Test record", "--author", "Ann", "--github-id", "ann",
                "--blurb", "Three seeds of the test.", "--script", str(script), "--date",
                "2026-11-24", "--out", str(r.out),
                *(["--baseline-pr", "1019", "--baseline-bpb", ",".join(map(str, r.base))]
                  if baseline else []), *extra]
    r.args = args
    r.run = lambda logs, *extra, baseline=True: mr.main(args(logs, *extra, baseline=baseline))
    return r


def _assert_refused(rec, capsys, logs, msg, *extra):
    assert rec.run(logs, *extra) == 1
    err = capsys.readouterr().err
    assert msg in err and "nothing written" in err, err
    assert not rec.out.exists()
    assert not (rec.out.parent.exists() and list(rec.out.parent.iterdir()))
    return err


def test_record_three_seeds(rec):
    from scipy import stats
    logs = rec.write_logs()
    assert rec.run(logs) == 0
    files = sorted(p.name for p in rec.out.iterdir())
    assert files == ["README.md", "submission.json", "train_curves.png", "train_gpt.py",
                     "train_seed314.log", "train_seed42.log", "train_seed999.log"]
    assert (rec.out / "train_gpt.py").read_text() == rec.wrapper
    assert (rec.out / "train_seed314.log").read_bytes() == Path(logs[1]).read_bytes()
    sub = json.loads((rec.out / "submission.json").read_text())
    # upstream's keys, in upstream's order, then ours
    assert list(sub)[:17] == ["author", "github_id", "name", "date", "track", "val_bpb",
                              "val_bpb_std", "seeds", "seed_results", "comparison_baseline_pr",
                              "delta_vs_pr1019_bpb", "hardware", "pytorch_version",
                              "technique_summary", "blurb", "val_loss", "score_line"]
    assert (sub["author"], sub["github_id"], sub["name"], sub["date"], sub["track"]) == \
        ("Ann", "ann", "Test record", "2026-11-24", "10min_16mb")
    assert sub["blurb"] == "Three seeds of the test."
    assert sub["seeds"] == rec.seeds
    mean, std = np.mean(rec.bpbs), np.std(rec.bpbs, ddof=1)
    assert sub["val_bpb"] == round(mean, 8) and sub["val_bpb_std"] == round(std, 8)
    assert sub["val_bpb"] == 1.08971631 and sub["val_bpb_std"] == 0.00028794  # upstream's numbers
    assert sub["comparison_baseline_pr"] == 1019 and isinstance(sub["comparison_baseline_pr"], int)
    assert sub["delta_vs_pr1019_bpb"] == round(mean - np.mean(rec.base), 5) == -0.02502
    assert sub["delta_bpb"] == pytest.approx(mean - np.mean(rec.base), abs=1e-12)
    ref = stats.ttest_ind(rec.bpbs, rec.base, equal_var=False, alternative="less")
    assert sub["welch_t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert sub["p_value"] == pytest.approx(ref.pvalue, rel=1e-12) and sub["p_value"] < 0.01
    assert sub["welch_df"] == pytest.approx(ref.df, rel=1e-12)
    assert sub["baseline_val_bpb"] == rec.base
    assert sub["hardware"] == "8xH100 80GB SXM" and sub["pytorch_version"] == "2.11.0+cu130"
    assert sub["technique_summary"] == (
        "SP4096, 12x512 transformer (MLP 4x), depth recurrence on layers 4,5, parallel residual "
        "lanes from layer 7, value embeddings on layers 8,9,10, full-Hessian GPTQ int6 + brotli, "
        "sliding-window eval stride 64, score-first TTT")
    assert sub["bytes_code"] == rec.size and sub["bytes_total"] == 15_960_000 + rec.size
    assert sub["val_loss"] == round(np.mean(rec.losses), 8)
    assert (sub["python_version"], sub["cuda_version"], sub["code_sha256"]) == \
        ("3.12.3", "13.0", rec.sha)
    s42 = sub["seed_results"]["42"]
    assert list(s42)[:2] == ["val_bpb", "artifact_bytes"]
    assert s42["val_bpb"] == rec.bpbs[0] and s42["val_loss"] == rec.losses[0]
    assert s42["artifact_bytes"] == 15_960_000 + rec.size and s42["steps"] == 5453
    assert (s42["train_ms"], s42["gptq_ms"], s42["train_total_ms"]) == (590_026, 9_500, 599_526)
    assert s42["scores"]["final_int6_ttt"]["val_bpb"] == 1.336032  # recorded, not the score
    assert s42["env"]["gpu_count"] == 8 and s42["run_id"] == "run_seed42"
    assert "final_int6_ttt" not in sub["seed_results"]["314"]["scores"]
    readme = (rec.out / "README.md").read_text()
    assert readme.startswith("# Test record\n") and "**val_bpb 1.08971631**" in readme
    assert "PR #1019" in readme and "-0.02502" in readme
    png = (rec.out / "train_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image as mpimg
    img = mpimg.imread(str(rec.out / "train_curves.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in rec.out.parent.iterdir()) == [rec.out.name]  # no temp folder


def test_record_rounding_is_upstreams():
    a = mr.welch_ttest_less([1.0], [2.0, 3.0])
    assert a == {"welch_t": None, "welch_df": None, "p_value": None}
    assert mr.welch_ttest_less([1.0, 1.0], [2.0, 2.0])["welch_t"] is None  # zero variance


def test_reproduce_section_has_every_non_default_setting(rec):
    assert rec.run(rec.write_logs(), baseline=False) == 0
    readme = (rec.out / "README.md").read_text()
    repro = readme.split("## Reproduce\n")[1].split("## ")[0]
    assert "python data/prepare.py download --variant sp4096 --train-shards 80" in repro
    cmds = [l for l in repro.splitlines() if "torchrun" in l]
    assert len(cmds) == 3
    for seed, cmd in zip(rec.seeds, cmds):
        assert cmd.startswith(f"SEED={seed} ")
        assert cmd.endswith("torchrun --standalone --nproc_per_node=8 train_gpt.py")
        for k, v in SETTINGS.items():
            want = {True: "1", False: "0"}[v] if isinstance(v, bool) else ",".join(map(str, v)) if isinstance(
                v, list) else str(v)
            want = want or "''"  # an empty list: RECUR_LAYERS='' (off)
            assert f" {k.upper()}={want} " in cmd, (k, cmd)
        for per_run in ("RUN_ID", "DATA_DIR", "OUT_DIR"):
            assert per_run + "=" not in cmd
    sub = json.loads((rec.out / "submission.json").read_text())
    assert not [k for k in sub if "baseline" in k or k.startswith("delta") or "welch" in k]
    assert "p_value" not in sub


def test_reproduce_quotes_and_vocab(rec):
    ov = {i: dict(settings={"vocab_size": 1024, "ve_layers": "", "run_id": "x"}) for i in range(3)}
    assert rec.run(rec.write_logs(ov, hp={i: {"vocab_size": 1024} for i in range(3)})) == 0
    repro = (rec.out / "README.md").read_text().split("## Reproduce\n")[1]
    assert "--variant sp1024 " in repro and "VE_LAYERS='' VOCAB_SIZE=1024 torchrun" in repro
    assert "SP1024, " in json.loads((rec.out / "submission.json").read_text())["technique_summary"]
    hp = {"recur_layers": "0", "ve_enabled": "False", "parallel_start_layer": "0", "ttt_enabled": "False",
          "gptq_enabled": "False", "sliding_window_enabled": "False", "mlp_mult": "3.5"}
    assert mr.technique_summary(mr.parse_hparams("\n".join(hparams(1, "x", hp)))) == (
        "SP4096, 12x512 transformer (MLP 3.5x), depth recurrence on layers 0, int6 + brotli")
    hp.update(recur_passes="3", smear_gate="True", attn_out_gate="sparse", muon_ns="polar")  # beyond the reference
    assert mr.technique_summary(mr.parse_hparams("\n".join(hparams(1, "x", hp)))) == (
        "SP4096, 12x512 transformer (MLP 3.5x), depth recurrence on layers 0 (3 passes), SmearGate, sparse attention "
        "output gate, Polar Express Newton-Schulz, int6 + brotli")


def test_compliance_section_numbers(rec):
    ov = {1: dict(eval_total_ms=599_999, train_ms=590_500, gptq_ms=9_499)}
    assert rec.run(rec.write_logs(ov)) == 0
    text = (rec.out / "README.md").read_text()
    comp = text.split("## Compliance\n")[1].split("\n## ")[0]
    for word in ("Causal evaluation", "Full normalized distribution", "softmax over all 4096",
                 "Single left-to-right pass", "advance by 64 tokens", "scored exactly once",
                 "Score before update (TTT)"):
        assert word in comp, word
    assert "SLOT" not in comp  # only the evaluations that ran
    total = 15_960_000 + rec.size
    assert f"| 42 | {total:,} | 590,026 + 9,500 = 599,526 | 95,000 |" in comp
    assert f"| 314 | {total:,} | 590,500 + 9,499 = 599,999 | 599,999 |" in comp
    assert "16,000,000" in comp and "600,000" in comp


def test_lora_ttt_technique_and_compliance():
    hp = mr.parse_hparams("\n".join(hparams(1, "x", {"ttt_mode": "lora", "ttt_lora_rank": 96, "ttt_phases": 3})))
    assert mr.technique_summary(hp).endswith(", score-first document-wise LoRA TTT (rank 96, 3 phases)")
    runs = [dict(summary=summary(1, 1.0, 2.0, code_sha="x", code_bytes=1, ttt=True), hparams=hp, artifact_bytes=1)]
    comp = "\n".join(mr.compliance_lines({}, runs))
    assert "Score before update (document-wise LoRA TTT)" in comp and "only on documents already scored" in comp


def test_compliance_without_ttt_and_with_slot(rec):
    slot = {"final_int6_slot": {"val_loss": 2.4, "val_bpb": 1.05, "eval_ms": 1000}}
    ov = {i: dict(ttt=False) for i in range(3)}
    assert rec.run(rec.write_logs(ov)) == 0
    comp = (rec.out / "README.md").read_text().split("## Compliance\n")[1]
    assert "No test-time updates" in comp and "TTT" not in comp
    sc = summary(42, 1.0, 2.0, code_sha=rec.sha, code_bytes=rec.size)["scores"]
    ov = {i: dict(ttt=False, scores={**sc, **slot}) for i in range(3)}
    assert rec.run(rec.write_logs(ov), "--force") == 0
    comp = (rec.out / "README.md").read_text().split("## Compliance\n")[1]
    assert "Score before update (SLOT)" in comp and "No test-time updates" not in comp


def test_github_id_and_blurb_required(rec, capsys):
    logs = rec.write_logs()
    args = rec.args(logs)
    for flag in ("--github-id", "--blurb"):
        i = args.index(flag)
        with pytest.raises(SystemExit) as e:
            mr.main(args[:i] + args[i + 2:])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    assert rec.run(logs, "--github-id", " ") == 1
    assert "github id is required" in capsys.readouterr().err
    with pytest.raises(mr.RecordError, match="github id"):
        mr.assemble_record(logs, "n", "a", "", "b", script=str(rec.script), out=str(rec.out))
    assert not rec.out.exists()


def test_baseline_needs_pr_and_values(rec, capsys):
    logs = rec.write_logs()
    a = rec.args(logs, baseline=False)
    for extra in (["--baseline-pr", "7"], ["--baseline-bpb", "1.1,1.2"]):
        assert mr.main(a + extra) == 1
        err = capsys.readouterr().err
        assert "both --baseline-pr and --baseline-bpb" in err and not rec.out.exists()
    assert mr.main(a + ["--baseline-pr", "7", "--baseline-bpb", "1.1"]) == 0  # one value: no t-test
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["delta_vs_pr7_bpb"] == round(np.mean(rec.bpbs) - 1.1, 5)
    assert sub["welch_t"] is None and sub["p_value"] is None


@pytest.mark.parametrize("env,want", [
    ({"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 8}, "8xH100 80GB SXM"),
    ({"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}, "1xH100 80GB SXM"),
    ({"gpu_name": "NVIDIA A100-SXM4-80GB", "gpu_count": 4}, "4xNVIDIA A100-SXM4-80GB"),
    ({"gpu_name": None, "gpu_count": 0, "gpu": "none (cpu, 2 cores)"}, "none (cpu, 2 cores)"),
])
def test_hardware_name(env, want):
    assert mr.hardware_name(env) == want


def test_hardware_override_and_technique_override(rec):
    assert rec.run(rec.write_logs(), "--hardware", "8xH100 80GB SXM (RunPod)",
                   "--technique-summary", "my words") == 0
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["hardware"] == "8xH100 80GB SXM (RunPod)" and sub["technique_summary"] == "my words"


def test_record_roundtrip_score_line(rec):
    logs = rec.write_logs({i: dict(sliding=False) for i in range(3)})
    assert rec.run(logs) == 0
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["score_line"] == "final_int6_roundtrip"
    assert sub["seed_results"]["314"]["val_bpb"] == round(rec.bpbs[1] + 0.0186, 8)
    assert sub["val_bpb"] == round(np.mean(rec.bpbs) + 0.0186, 8)
    assert "non-overlapping windows" in (rec.out / "README.md").read_text()


def test_record_accepts_source_hash_and_prebuilt_wrapper(rec):
    src_sha = hashlib.sha256(SCRIPT_SRC.encode()).hexdigest()
    ov = {i: dict(code_sha=src_sha, code_bytes=len(SCRIPT_SRC)) for i in range(3)}
    assert rec.run(rec.write_logs(ov)) == 0
    assert (rec.out / "train_gpt.py").read_text() == rec.wrapper  # stripped by default
    # --no-strip wraps the source as it is
    assert rec.run(rec.write_logs(ov), "--force", "--no-strip") == 0
    assert bw.extract_source((rec.out / "train_gpt.py").read_text()) == SCRIPT_SRC
    # a prebuilt wrapper given as --script is shipped byte for byte
    prebuilt = rec.tmp / "prebuilt.py"
    prebuilt.write_text(bw.make_wrapper(SCRIPT_SRC, check="none"))
    psha = hashlib.sha256(prebuilt.read_bytes()).hexdigest()
    ov = {i: dict(code_sha=psha, code_bytes=prebuilt.stat().st_size) for i in range(3)}
    logs = rec.write_logs(ov)
    assert mr.main(["--logs", *logs, "--name", "n", "--author", "a", "--github-id", "g",
                    "--blurb", "b", "--script", str(prebuilt), "--out", str(rec.tmp / "r2")]) == 0
    assert (rec.tmp / "r2" / "train_gpt.py").read_bytes() == prebuilt.read_bytes()
    sub = json.loads((rec.tmp / "r2" / "submission.json").read_text())
    assert "comparison_baseline_pr" not in sub and sub["bytes_code"] == prebuilt.stat().st_size


@pytest.mark.parametrize("case,msg", [
    ("hash_differs", "different code"),
    ("hash_unknown", "matches neither"),
    ("oversize", "exceeds 16,000,000"),
    ("oversize_with_wrapper", "+ wrapper"),
    ("overtime", "over 600000"),
    ("overtime_train", "over 600000"),
    ("dup_seed", "duplicate seeds"),
    ("no_summary", "no 'summary:' line of a training run"),
    ("code_bytes", "code_bytes"),
    ("missing_key", "summary line lacks train_total_ms, env.data_fingerprint"),
    ("not_int", "summary model_bytes, total_bytes must be integers"),
    ("not_dict", "summary settings must be JSON objects"),
    ("bad_json", "summary line is not JSON"),
    ("no_hparams", "Hyperparameters"),
])
def test_record_refusals(rec, capsys, case, msg):
    other = "ab" * 32
    ov, seeds = {}, None
    if case == "hash_differs":
        ov = {2: dict(code_sha=other)}
    elif case == "hash_unknown":
        ov = {i: dict(code_sha=other) for i in range(3)}
    elif case == "oversize":
        ov = {1: dict(model_bytes=16_000_001 - rec.size)}
    elif case == "oversize_with_wrapper":  # the logged total fits, the shipped wrapper does not
        ov = {1: dict(model_bytes=16_000_001 - rec.size, total_bytes=15_999_000)}
    elif case == "overtime":
        ov = {0: dict(gptq_ms=10_000)}
    elif case == "overtime_train":
        ov = {0: dict(train_ms=600_001, gptq_ms=0, train_total_ms=0)}
    elif case == "dup_seed":
        seeds = [42, 314, 42]
    elif case == "code_bytes":
        ov = {0: dict(code_bytes=rec.size + 1)}
    elif case == "not_int":
        ov = {2: dict(model_bytes=1.5e7)}
    logs = rec.write_logs(ov, seeds=seeds)
    p = Path(logs[1])
    if case == "no_summary":
        p.write_text("".join(l for l in p.read_text().splitlines(True) if "summary" not in l))
    elif case == "missing_key":
        d = summary(314, 1.0, 2.0, code_sha=rec.sha, code_bytes=rec.size)
        del d["train_total_ms"], d["env"]["data_fingerprint"]
        p.write_text(make_log(d))
    elif case == "not_dict":
        d = summary(314, 1.0, 2.0, code_sha=rec.sha, code_bytes=rec.size)
        d["settings"] = []
        p.write_text(make_log(d))
    elif case == "bad_json":
        p.write_text(p.read_text().replace("summary: {", "summary: {,"))
    elif case == "no_hparams":
        p.write_text(p.read_text().replace("Hyperparameters:", "Hyper:"))
    _assert_refused(rec, capsys, logs, msg)


def test_record_boundaries_accepted(rec):
    ov = {0: dict(model_bytes=16_000_000 - rec.size, train_ms=590_000, gptq_ms=10_000,
                  eval_total_ms=600_000)}
    assert rec.run(rec.write_logs(ov)) == 0


def test_record_refuses_non_empty_out(rec, capsys):
    rec.out.mkdir(parents=True)
    (rec.out / "keep.txt").write_text("x")
    assert rec.run(rec.write_logs()) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in rec.out.iterdir()) == ["keep.txt"]


def test_read_log_uses_only_summary_and_hparams(rec):
    s = summary(7, 1.1, 2.5, code_sha=rec.sha, code_bytes=123, run_id="abc")
    r = mr.read_log(make_log(s))
    assert r["summary"] == s and r["ignored_runs"] == 0
    assert r["hparams"]["seed"] == "7" and r["hparams"]["num_layers"] == "12"
    assert r["hparams"]["eval_only"] == "" and r["hparams"]["mlp_mult"] == "4.0"
    assert "train_shards" not in r["hparams"]  # the block ends at the first other line
    # the human-readable lines (a bogus final_* line is in make_log) are not read
    assert r["summary"]["val_bpb"] == 1.1
    with pytest.raises(mr.RecordError, match="seed"):
        mr.read_log(make_log(s, hp={"seed": 8}))


def test_split_runs():
    text = "pre\nrun_id: a started: t\nx\nrun_id: b started: t\ny\n"
    assert mr.split_runs(text) == ["pre\nrun_id: a started: t\nx\n", "run_id: b started: t\ny\n"]
    assert mr.split_runs("no ids\n") == ["no ids\n"]
    assert len(mr.split_runs("run_id: a\n    log(f'run_id: {x}')\n")) == 1
    # split at "\n" only (str.splitlines would also split at \u2028, \x0c, \x85 ...)
    assert mr.split_runs("run_id: a\u2028run_id: x\x0crun_id: y\n") == ["run_id: a\u2028run_id: x\x0crun_id: y\n"]


def test_read_log_crlf(rec):
    s = summary(7, 1.1, 2.5, code_sha=rec.sha, code_bytes=123)
    r = mr.read_log(make_log(s).replace("\n", "\r\n"))
    assert r["summary"] == s and r["hparams"]["seed"] == "7" and r["hparams"]["eval_only"] == ""


def test_log_with_eval_only_runs_uses_the_training_run(rec):
    logs = rec.write_logs()
    p = Path(logs[1])
    train = p.read_text()
    before = eval_only_log(777, 1.5, 3.5, code_sha=rec.sha, code_bytes=rec.size, run_id="r0")
    after = eval_only_log(778, 1.7, 3.9, code_sha=rec.sha, code_bytes=rec.size, run_id="r1",
                          eval_total_ms=700_000)  # not the training run's: not checked
    failed = "run_id: r2 started: t\nHyperparameters:\n  seed: 5\nerror: rank 0: boom\n"
    p.write_text(before + train + failed + after)
    assert rec.run(logs) == 0
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["seeds"] == rec.seeds
    s = sub["seed_results"]["314"]
    assert s["val_bpb"] == rec.bpbs[1] and s["val_loss"] == rec.losses[1]
    assert s["run_id"] == "run_seed314" and s["eval_total_ms"] == 95_000
    assert (rec.out / "train_seed314.log").read_text() == before + train + failed + after


def test_log_with_two_training_runs_refused(rec, capsys):
    logs = rec.write_logs()
    p = Path(logs[0])
    again = summary(42, 1.2, 2.7, code_sha=rec.sha, code_bytes=rec.size, run_id="again")
    p.write_text(p.read_text() + make_log(again, extra=False))
    err = _assert_refused(rec, capsys, logs, "give one training run per log")
    assert "run_seed42" in err and "again" in err


@pytest.mark.parametrize("mode", ["eval_only", "export_only"])
def test_log_with_only_other_modes_refused(rec, capsys, mode):
    logs = rec.write_logs()
    text = eval_only_log(999, 1.0, 2.4, code_sha=rec.sha, code_bytes=rec.size)
    Path(logs[2]).write_text(text.replace('"mode": "eval_only"', f'"mode": "{mode}"'))
    _assert_refused(rec, capsys, logs, f"it has only {mode} runs")


@pytest.mark.parametrize("which", ["bpb_null", "loss_null", "bpb_nan", "bpb_inf"])
def test_non_finite_score_refused(rec, capsys, which):
    logs = rec.write_logs()
    p = Path(logs[1])
    key, val = {"bpb_null": ("val_bpb", None), "loss_null": ("val_loss", None),
                "bpb_nan": ("val_bpb", math.nan), "bpb_inf": ("val_bpb", math.inf)}[which]
    d = summary(314, rec.bpbs[1], rec.losses[1], code_sha=rec.sha, code_bytes=rec.size)
    d[key] = val
    p.write_text(make_log(d))
    assert ("NaN" if which == "bpb_nan" else "Infinity" if which == "bpb_inf" else
            f'"{key}": null') in p.read_text()
    _assert_refused(rec, capsys, logs, "not finite")


@pytest.mark.parametrize("base", ["nan,1.1,1.2", "1.1,inf", "-inf"])
def test_non_finite_baseline_refused(rec, capsys, base):
    logs = rec.write_logs()
    assert mr.main(rec.args(logs, baseline=False) + ["--baseline-pr", "1",
                                                     f"--baseline-bpb={base}"]) == 1
    assert "finite" in capsys.readouterr().err and not rec.out.exists()
    with pytest.raises(mr.RecordError, match="finite"):
        mr.assemble_record(logs, "n", "a", "g", "b", script=str(rec.script), out=str(rec.out),
                           baseline_pr=1, baseline_bpb=[1.1, float(base.split(",")[-1])]
                           if "inf" in base else [float("nan"), 1.1])
    assert not rec.out.exists()


def test_non_finite_optional_score_is_null_in_strict_json(rec):
    logs = rec.write_logs({0: dict(ttt=True, ttt_bpb=float("nan"))})
    assert "NaN" in Path(logs[0]).read_text()  # json.dumps default; the contract writes null
    assert rec.run(logs) == 0
    text = (rec.out / "submission.json").read_text()

    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c}")
    sub = json.loads(text, parse_constant=no_constants)
    assert sub["seed_results"]["42"]["scores"]["final_int6_ttt"]["val_bpb"] is None
    assert sub["seed_results"]["42"]["val_bpb"] == rec.bpbs[0]


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None)
                  for p in Path(path).rglob("*"))


@pytest.mark.parametrize("target", ["cwd", "cwd_parent", "script_dir", "log_dir", "log_file"])
def test_force_refuses_out_holding_inputs(rec, capsys, monkeypatch, target):
    logdir = rec.tmp / "runlogs"
    logdir.mkdir()
    logs = []
    for p in rec.write_logs():
        q = logdir / Path(p).name
        Path(p).rename(q)
        logs.append(str(q))
    (rec.tmp / "submission.json").write_text("{}")  # looks like a record: still refused
    (logdir / "submission.json").write_text("{}")
    work = rec.tmp / "work"
    work.mkdir()
    (work / "keep.txt").write_text("work in progress")
    monkeypatch.chdir(work)
    out = {"cwd": ".", "cwd_parent": "..", "script_dir": str(rec.tmp), "log_dir": str(logdir),
           "log_file": logs[0]}[target]
    before = _tree(rec.tmp)
    args = rec.args(logs, "--force")
    args[args.index("--out") + 1] = out
    assert mr.main(args) == 1
    err = capsys.readouterr().err
    assert "is or contains" in err and "nothing written" in err
    assert _tree(rec.tmp) == before


def test_force_only_replaces_a_previous_record(rec, capsys):
    logs = rec.write_logs()
    rec.out.mkdir(parents=True)
    (rec.out / "precious.txt").write_text("x")
    assert rec.run(logs, "--force") == 1
    assert "not a previous record" in capsys.readouterr().err
    assert sorted(p.name for p in rec.out.iterdir()) == ["precious.txt"]
    (rec.out / "precious.txt").unlink()
    rec.out.rmdir()
    rec.out.write_text("file")  # a file is never replaced
    assert rec.run(logs, "--force") == 1
    assert rec.out.read_text() == "file"
    rec.out.unlink()
    assert rec.run(logs) == 0  # a previous record is replaced, leaving nothing aside
    (rec.out / "old_extra.txt").write_text("old")
    assert rec.run(logs, "--force") == 0
    assert "old_extra.txt" not in {p.name for p in rec.out.iterdir()}
    assert (rec.out / "submission.json").exists()
    assert sorted(p.name for p in rec.out.parent.iterdir()) == [rec.out.name]


def test_force_restores_old_record_when_rename_fails(rec, monkeypatch):
    logs = rec.write_logs()
    assert rec.run(logs) == 0
    (rec.out / "marker.txt").write_text("old")
    old = _tree(rec.out)
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder into place
            raise OSError("simulated failure")
        return real_rename(a, b)
    monkeypatch.setattr(mr.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        mr.assemble_record(logs, "n", "a", "g", "b", script=str(rec.script), out=str(rec.out),
                           force=True)
    monkeypatch.undo()
    assert len(calls) >= 2
    assert _tree(rec.out) == old
    assert sorted(p.name for p in rec.out.parent.iterdir()) == [rec.out.name]


def test_files_written_with_write_atomic(rec, monkeypatch):
    import train_gpt
    written = []
    monkeypatch.setattr(mr, "write_atomic", lambda p, d: (written.append(p.name),
                                                          train_gpt.write_atomic(p, d)))
    assert rec.run(rec.write_logs()) == 0
    assert sorted(written) == sorted(p.name for p in rec.out.iterdir())
    assert not hasattr(bw, "atomic_write") and not hasattr(mr, "atomic_write")


def test_record_folder_mode_and_utf8_readme(rec, monkeypatch):
    real_open = builtins.open

    def strict_open(file, mode="r", *a, **kw):  # text-mode opens must name their encoding
        if "b" not in mode:
            assert kw.get("encoding") or (len(a) >= 2 and a[1]), (file, mode)
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr(mr, "open", strict_open, raising=False)
    logs = rec.write_logs()
    mr.assemble_record(logs, "Ünïcode → record ✓", "Zoë", "zoë", "blürb", script=str(rec.script),
                       out=str(rec.out))
    monkeypatch.undo()
    assert (rec.out / "README.md").read_text(encoding="utf-8").startswith("# Ünïcode → record ✓")
    sub = json.loads((rec.out / "submission.json").read_text(encoding="utf-8"))
    assert sub["author"] == "Zoë" and sub["blurb"] == "blürb"
    assert (rec.out.stat().st_mode & 0o777) == 0o755


@pytest.mark.parametrize("case,ov,hp,msg", [
    ("tokenizer", {2: dict(tok_sha="3d" * 32)}, None, "tokenizer_sha256"),
    ("data", {1: dict(data_fp="4c" * 32)}, None, "data_fingerprint"),
    ("hparams", None, {1: {"num_layers": 13, "train_files": "./other/*.bin"}},
     "hyperparameters num_layers, train_files"),
    ("hparam_missing", None, {2: {"matrix_lr": None}}, "hyperparameters matrix_lr"),
    ("world_size", None, {0: {"world_size": 4}}, "hyperparameters world_size"),
    ("settings", {1: dict(settings={**SETTINGS, "num_layers": 13})}, None, "summary settings"),
    ("eval_time", {1: dict(eval_total_ms=600_001)}, None, "eval_total 600001 ms exceeds"),
    ("mixed_score", {2: dict(sliding=False)}, None, "scored by different lines"),
])
def test_cross_log_refusals(rec, capsys, case, ov, hp, msg):
    _assert_refused(rec, capsys, rec.write_logs(ov, hp=hp), msg)


def test_cross_log_allowed_differences(rec):
    hp = {i: {"rank": 0, "local_rank": i, "out_dir": f"/o{i}", "dump_token_nll": f"d{i}",
              "run_id": f"id{i}"} for i in range(3)}
    ov = {i: dict(eval_total_ms=600_000 - i, settings={**SETTINGS, "out_dir": f"/o{i}",
                                                       "data_dir": f"/d{i}"}) for i in range(3)}
    assert rec.run(rec.write_logs(ov, hp=hp)) == 0
    assert sorted(mr.HPARAMS_MAY_DIFFER) == sorted(
        ["seed", "run_id", "rank", "local_rank", "out_dir", "dump_token_nll"])


def test_bom_script_is_wrapped_without_bom(rec):
    rec.script.write_bytes(b"\xef\xbb\xbf" + SCRIPT_SRC.encode())
    assert rec.run(rec.write_logs()) == 0
    assert (rec.out / "train_gpt.py").read_text() == rec.wrapper


def test_cli_subprocess_and_import_side_effects(rec):
    r = subprocess.run([sys.executable, "-c", "import make_record, sys; "
                        "print('matplotlib' in sys.modules, 'scipy' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"] and r.stderr == ""
    r = subprocess.run([sys.executable, str(ROOT / "make_record.py"), *rec.args(rec.write_logs())],
                       cwd=rec.tmp, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "val_bpb 1.08971631" in r.stdout and "delta_vs_pr1019_bpb -0.02502" in r.stdout
    assert math.isfinite(json.loads((rec.out / "submission.json").read_text())["p_value"])
