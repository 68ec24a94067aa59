"""bench/ablate.py: two variants on one seed at the tiny config (base + every technique beyond the reference) and
the table from their summary lines; resuming, failures and the statistics with a stand-in for train_gpt.py."""
import json
import sys

import pytest

from conftest import ROOT, run_train, tiny_env

sys.path.insert(0, str(ROOT / "bench"))
import ablate  # noqa: E402


def test_two_variants_one_seed_at_the_tiny_config(tmp_path, tiny_data_dir):
    env = tiny_env(tiny_data_dir, tmp_path / "unused")
    sets = [f"--set={k}={env[k]}" for k in ("DATA_DIR", "VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS",
                                             "NUM_KV_HEADS", "MLP_MULT", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS",
                                             "MAX_WALLCLOCK_SECONDS", "RECUR_LAYERS", "PARALLEL_START_LAYER",
                                             "VE_LAYERS", "XSA_LAST_N", "VE_DIM", "VAL_LOSS_EVERY", "EVAL_STRIDE",
                                             "GPTQ_CALIBRATION_BATCHES")]
    out = tmp_path / "abl"
    args = [sys.executable, str(ROOT / "bench" / "ablate.py"), "--out", str(out), "--seeds", "5", "--set=ITERATIONS=8",
            *sets, "--variant", "all", "MUON_NS=polar", "RECUR_PASSES=3", "SMEAR_GATE=1", "ATTN_OUT_GATE=sparse"]
    r = run_train({**env, "OUT_DIR": ""}, *args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[1/2] base_s5: running" in r.stdout and "[2/2] all_s5: " in r.stdout and "vs base)" in r.stdout
    table = json.loads((out / "ablation.json").read_text())
    base, all_on = table["variants"]["base"], table["variants"]["all"]
    assert all_on["settings"] == {"MUON_NS": "polar", "RECUR_PASSES": "3", "SMEAR_GATE": "1", "ATTN_OUT_GATE": "sparse"}
    summaries = {}
    for name in ("base", "all"):
        log = (out / "runs" / f"{name}_s5" / "logs" / f"{name}_s5.txt").read_text().strip().splitlines()
        summaries[name] = json.loads(log[-1][len("summary: "):])
        assert summaries[name]["seed"] == 5 and summaries[name]["steps"] == 8
    for key in ("pre_quant", "final_int6_roundtrip", "final_int6_sliding_window"):
        bpb = lambda n: (summaries[n]["pre_quant"] if key == "pre_quant" else summaries[n]["scores"][key])["val_bpb"]
        assert all_on["delta"][key] == dict(mean=pytest.approx(bpb("all") - bpb("base")), se=None, n=1), key
        assert base["bpb"][key]["mean"] == bpb("base") and key not in base["delta"]
    assert all_on["params"] - base["params"] == 13 + 4 * 2 * 12  # SmearGate + a 2 x 12 gate per layer
    assert all_on["total_bytes"] == summaries["all"]["total_bytes"] and base["steps"] == 8 and base["tok_s"] > 0
    md = (out / "ablation.md").read_text()
    assert md.startswith("| variant | settings | Δ pre-quant BPB | Δ roundtrip BPB | Δ sliding BPB | steps |")
    assert "| all | MUON_NS=polar RECUR_PASSES=3 SMEAR_GATE=1 ATTN_OUT_GATE=sparse | " in md and md in r.stdout


FAKE = """
import json, os, sys
from pathlib import Path
env = os.environ
log = Path(env["OUT_DIR"]) / "logs" / (env["RUN_ID"] + ".txt")
log.parent.mkdir(parents=True, exist_ok=True)
with open(Path(sys.argv[1]), "a") as f:
    f.write(env["RUN_ID"] + "\\n")
bpb = 2.0 + 0.01 * int(env["SEED"]) - 0.001 * int(env.get("GAIN", "0")) * int(env["SEED"])
score = lambda b: dict(val_loss=b, val_bpb=b, eval_ms=1)
summary = dict(seed=int(env["SEED"]), steps=10, train_ms=1000, settings={"train_batch_tokens": 100}, model_params=7,
               total_bytes=1000, pre_quant=score(bpb - 0.1), scores={"final_int6_roundtrip": score(bpb + 0.1),
               "final_int6_sliding_window": score(bpb)})
log.write_text("started\\n" + ("summary: " + json.dumps(summary) + "\\n" if env.get("FAIL") != env["RUN_ID"] else ""))
"""


def test_resume_reruns_only_what_did_not_finish(tmp_path):
    """With a stand-in for train_gpt.py: paired deltas and their standard errors over 3 seeds; a second invocation
    runs nothing again except a run cut short; a failed run is reported and the others still tabled."""
    (tmp_path / "fake.py").write_text(FAKE)
    calls, out = tmp_path / "calls.txt", tmp_path / "abl"
    args = ["--out", str(out), "--seeds", "1,2,3", "--cmd", f"{sys.executable} {tmp_path / 'fake.py'} {calls}",
            "--variant", "gain", "GAIN=1"]
    assert ablate.main(args + ["--set", "FAIL=gain_s2"]) == 1  # gain_s2 fails
    row = json.loads((out / "ablation.json").read_text())["variants"]["gain"]
    assert row["delta"]["final_int6_sliding_window"] == dict(mean=pytest.approx(-0.002), se=pytest.approx(0.001), n=2)
    assert row["tok_s"] == 1000 and row["params"] == 7
    assert ablate.main(args + ["--set", "FAIL=gain_s2"]) == 1  # same settings: only the failed run again
    assert calls.read_text().split() == ["base_s1", "gain_s1", "base_s2", "gain_s2", "base_s3", "gain_s3", "gain_s2"]
    with pytest.raises(SystemExit, match="another command or settings"):
        ablate.main(args)  # finished runs of other settings in the folder are not mixed in
    out2 = tmp_path / "abl2"
    assert ablate.main([a.replace(str(out), str(out2)) for a in args]) == 0
    row = json.loads((out2 / "ablation.json").read_text())["variants"]["gain"]
    for key, _ in ablate.METRICS[:3]:
        assert row["delta"][key] == dict(mean=pytest.approx(-0.002), se=pytest.approx(0.000577, rel=1e-3), n=3)
    log = out2 / "runs" / "gain_s3" / "logs" / "gain_s3.txt"
    log.write_text("started\n")  # cut short
    n = len(calls.read_text().split())
    assert ablate.main([a.replace(str(out), str(out2)) for a in args] + ["--report"]) == 0  # runs nothing
    row = json.loads((out2 / "ablation.json").read_text())["variants"]["gain"]
    assert len(calls.read_text().split()) == n and row["delta"]["pre_quant"]["n"] == 2
    assert ablate.main([a.replace(str(out), str(out2)) for a in args]) == 0
    assert calls.read_text().split()[n:] == ["gain_s3"]


def test_mean_and_standard_error():
    assert ablate.mean_se([1.0, 2.0, 4.0]) == dict(mean=pytest.approx(7 / 3), se=pytest.approx(0.8819171), n=3)
    assert ablate.mean_se([0.5]) == dict(mean=0.5, se=None, n=1)
