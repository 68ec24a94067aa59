"""bench/gpu_check.py, the GPU shakedown: its CPU mode end to end (so the script cannot rot between GPU runs), and
the numbers it derives from a log."""
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_cpu_mode_end_to_end_with_a_section_cut_at_its_deadline(tmp_path, tiny_data_dir):
    """Every section runs in its own process, ended at its own deadline: here env's is too short for it to even
    import torch, so it is cut and reported, and the other sections run as usual."""
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--data-dir", str(tiny_data_dir),
                        "--out", str(out), "--section-seconds", "env=0.3"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), cwd=str(ROOT))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # not every section is ok
    rep = json.loads((out / "gpu_check.json").read_text())
    secs = rep["sections"]
    assert list(secs) == ["env", "attention", "compiled", "train"]
    cut = secs["env"]
    assert cut["ok"] is False and cut["timed_out"] is True and cut["error"] == "cut at its deadline (0.3s)"
    assert cut["deadline_s"] == 0.3 and cut["seconds"] < 10 and "gpu_check: env FAILED: cut at its deadline" in r.stdout
    assert all(secs[n]["ok"] for n in ("attention", "compiled", "train")), r.stdout[-3000:]
    assert secs["train"]["deadline_s"] <= gpu_check.BUDGET_S and rep["wall_s"] < gpu_check.BUDGET_S
    assert secs["train"]["env"]["MAX_WALLCLOCK_SECONDS"] == "10"  # CPU's default: the budget leaves room for it
    s = secs["train"]["summary"]
    assert s["attention_backend"] == "sdpa (cpu)" and s["steps"] > 0 and s["tok_s"] > 0 and s["timed_compiles"] == 0
    assert s["peak_allocated_mib"] > 0 and s["model_params"] > 0 and s["val_tokens"] > 0
    assert s["recurrence_step"] > 0 and s["tok_s_before_recurrence"] > 0 and s["tok_s_after_recurrence"] > 0
    assert 0 <= s["export_s"] < 60 and s["total_bytes"] == s["model_bytes"] + s["code_bytes"]
    for name in ("pre_quant", "roundtrip", "sliding"):
        assert s[name]["ms"] > 0 and s[name]["tokens_per_s"] > 0 and s[name]["est_fineweb_val_8gpu_s"] > 0
    assert s["errors"] == [] and s["est_steps_in_590s_8gpu"] > 0
    log = (out / "train.log").read_text()
    # every pattern finds its line, except those a CPU run without compile, pruning or trouble does not write
    seen = set(gpu_check.parse_log([(0.0, line) for line in log.splitlines()]))
    assert set(gpu_check.LOG_LINES) - seen <= {"attention_rejected", "attention_cross_check", "warmup_step",
                                               "quant_verify", "selective_prune", "warning", "error"}
    assert s["eval_attention"][0].startswith("final_int6_roundtrip ") and len(s["eval_attention"]) == 2
    assert {"quant_knob", "quant_bits", "export"} <= seen and s["bits_per_weight"] and s["predicted_bytes"] > 0
    att = secs["attention"]
    assert att["cpu"]["sdpa"]["matches_math"] and att["cpu"]["timed"]["fwd_bwd_ms"] > 0
    comp = secs["compiled"]
    assert comp["loss_abs_diff"] < 1e-4 and comp["grad_norm_rel_diff"] < 1e-4
    assert comp["probe"]["attention_backend"] == "sdpa (cpu)"


def test_env_section_and_a_section_that_dies(tmp_path):
    """The env section in-process (the end-to-end test cuts it); a section whose process dies without a result is
    reported as such."""
    env = gpu_check.section_env({"device": gpu_check.torch.device("cpu")})
    assert env["mode"] == "cpu" and env["torch"] and env["fa3"] is False and env["fa3_missing"]
    res = gpu_check.run_section("env", ["--cpu", "--out", str(tmp_path), "--no-such-option"], 60)
    assert res["ok"] is False and res["error"] == "its process ended with code 2 before its result"
    assert "unrecognized arguments: --no-such-option" in res["output_tail"]


def test_summary_numbers_from_a_gpu_style_log():
    """Throughput by wall time around the recurrence switch, the rate search and export lines, eval tokens/s and
    the 8-GPU FineWeb estimates, on lines in train_gpt's formats as a GPU run writes them."""
    text = """env: attention_backend: cudnn (native gqa)
attention_probe: rejected fa3: not importable (ModuleNotFoundError: No module named 'flash_attn_interface')
attention_probe: cudnn (native gqa) agrees with flash (native gqa) at the training shape: output 0.004, input gradient \
0.006 (relative)
model_params:34401380
val_tokens: 1000000
warmup_step: 20/20
5/20000 train_loss: 7.1 train_time: 0.10m tok/s: 900000
15/20000 train_loss: 6.0 train_time: 0.20m tok/s: 950000
recurrence:activated at step 16, virtual_layers=[0, 1]
25/20000 train_loss: 5.5 train_time: 0.30m tok/s: 940000
35/20000 train_loss: 5.0 train_time: 0.40m tok/s: 930000
stopping_early: wallclock_cap train_time: 140000ms step: 180/20000
peak memory allocated: 27000 MiB reserved: 30000 MiB
train_summary: steps: 180 train_time: 140000ms tok/s: 1000000 mfu: 41.2% timed_compiles: 0
gptq:hessians 66 from 64 batches in 3000ms
gptq:quantized in 2000ms (full GPTQ): int6: 66 tensors / 1 params
quant:grid knob: 0.0312 (row step = max(row max / qmax, knob x unit); 0 = finest grid) rtn_evals: 14 gptq_passes: 1
quant:bits_per_weight int8: 2.900 int6: 3.512 fp16: 16.000
quant:verify: knob 0.03 gave 16100000 model bytes, predicted 15950000; searching again
Code size: 80000 bytes
selective_prune: zeroed 10 codes -> total 15999000 bytes
export: predicted 15910000 actual 15919000 model bytes (+0.06%), compress+write 12500ms
Serialized model int6+brotli: 15919000 bytes
Total submission size int6+brotli: 15999000 bytes
final_int6_roundtrip val_loss:2.5 val_bpb:1.2 eval_time:2000ms
eval_attention: final_int6_roundtrip cudnn at 32x2048
final_int6_sliding_window val_loss:2.4 val_bpb:1.1 eval_time:20000ms
eval_total: 22000ms
WARNING: something"""
    times = {"15/": 20.0, "recurrence": 21.0, "25/": 30.0, "35/": 41.0, "5/": 10.0}
    lines = [(next((v for k, v in times.items() if line.startswith(k)), 0.0), line) for line in text.splitlines()]
    s = gpu_check.summarize(gpu_check.parse_log(lines), 786432)
    assert s["attention_backend"] == "cudnn (native gqa)"
    assert s["attention_rejected"] == ["fa3: not importable (ModuleNotFoundError: No module named "
                                       "'flash_attn_interface')"]
    assert s["attention_cross_check"].startswith("cudnn (native gqa) agrees with flash (native gqa) at the training")
    assert s["eval_attention"] == ["final_int6_roundtrip cudnn at 32x2048"]
    assert (s["tok_s"], s["mfu"], s["timed_compiles"], s["peak_allocated_mib"]) == (1000000, "41.2%", 0, 27000)
    assert s["recurrence_step"] == 16 and s["tok_s_before_recurrence"] == round(10 * 786432 / 10.0)
    assert s["tok_s_after_recurrence"] == round(10 * 786432 / 11.0)
    assert s["export_s"] == 12.5 and s["gptq_ms"] == 5000 and s["selective_prune"] and s["warnings"] == ["something"]
    assert (s["knob"], s["rtn_evals"], s["gptq_passes"], s["predicted_bytes"]) == (0.0312, 14, 1, 15910000)
    assert s["prediction_error"] == "+0.06%" and s["bits_per_weight"].startswith("int8: 2.900") and s["quant_verify"]
    assert s["sliding"]["tokens_per_s"] == 50000
    assert s["sliding"]["est_fineweb_val_8gpu_s"] == round(45508608 / 400000, 1)
    assert s["roundtrip"]["est_fineweb_val_8gpu_s"] == round(45508608 / 4000000, 1)
    assert s["est_steps_in_590s_8gpu"] == round(8e6 * 590 / 786432)
