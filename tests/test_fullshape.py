"""The default architecture at its real shapes on CPU: the 11x512 model at sequence length 2048 through one
optimizer step, calibration, the rate search and the export under the real 16,000,000-byte limit, then the
roundtrip and sliding evaluations on a short val slice. Tiny configs hide scale bugs (the export once fitted at
0.9 MB on the tiny model and came out at 23 MB on this one); this run catches them between GPU runs. It runs with
every technique beyond the reference on (three recurrence passes, SmearGate, the sparse attention output gate, Polar
Express).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import prepare
import train_gpt as t
from conftest import run_train, tiny_env


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """The embedded sample's shards (the proxy SP4096 tokenizer) and a 4,097-token val slice: two windows."""
    root = tmp_path_factory.mktemp("fullshape")
    ds = prepare.sample(root / "data", workers=1, progress=False)
    val = t.load_shard(next(ds.glob("fineweb_val_*.bin")))[:2 * 2048 + 1]
    header = np.zeros(t.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (t.SHARD_MAGIC, t.SHARD_VERSION, len(val))
    (root / "val_slice.bin").write_bytes(header.tobytes() + np.asarray(val, dtype="<u2").tobytes())
    return root / "data", root / "val_slice.bin"


# every technique beyond the reference (README) on, at the default architecture (the defaults, the reference's
# recipe, are test_trainer's)
ALL_ON = dict(MUON_NS="polar", RECUR_PASSES="3", SMEAR_GATE="1", ATTN_OUT_GATE="sparse")


def test_default_architecture_dry_run(sample_data, tmp_path):
    data, val = sample_data
    env = tiny_env(data, tmp_path, RUN_ID="full", VAL_FILES=val, OMP_NUM_THREADS="2")
    for name in list(env):  # back to every default except what a CPU can afford
        settings = {f.name.upper() for _, f in t.Hyperparameters.declared()}
        if name in settings and name not in ("DATA_DIR", "OUT_DIR", "RUN_ID", "VAL_FILES"):
            del env[name]
    env.update(ITERATIONS="1", MAX_WALLCLOCK_SECONDS="0", TRAIN_BATCH_TOKENS="16384", VAL_LOSS_EVERY="0",
               GPTQ_CALIBRATION_BATCHES="1", GPTQ_ENABLED="0", EVAL_STRIDE="512", RECUR_START_STEP="0")
    env.update(ALL_ON)
    r = run_train(env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout
    # the reference's 34,401,380 (test_trainer checks it) + SmearGate's 13 + the sparse gates' 11 x 8 x 12
    assert "model_params:34402449" in log and "  train_seq_len: 2048" in log and "  num_layers: 11" in log
    assert "recurrence:activated at step 0, virtual_layers=[0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]" in log
    assert re.search(r"^train_summary: steps: 1 ", log, re.M)
    code = int(re.search(r"^Code size: (\d+) bytes$", log, re.M).group(1))
    model = int(re.search(r"^Serialized model int6\+brotli: (\d+) bytes$", log, re.M).group(1))
    assert 0.995 * 16_000_000 <= code + model <= 16_000_000
    assert float(re.search(r"^quant:grid knob: (\S+)", log, re.M).group(1)) > 0  # the finest grid does not fit
    for name in ("final_int6_roundtrip", "final_int6_sliding_window"):
        assert re.search(rf"^{name} val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$", log, re.M), name
    cfg, entries = t.load_artifact(tmp_path / "final_model.int6.ptz")
    assert cfg == t.ModelConfig(recur_passes=3, smear_gate=True, attn_out_gate="sparse"), cfg
    m = t.GPT(cfg)
    m.load_state_dict(t.dequantize_entries(entries), strict=True)


def test_gptq_at_the_default_shapes():
    """The largest matrices of the default model (MLP in and out: 2048x512, 512x2048; 16 blocks of 128 columns
    on the long side) through GPTQ on a floor-bound grid: codes in range, better than rounding to nearest."""
    g = torch.Generator().manual_seed(0)
    for rows, cols in ((2048, 512), (512, 2048)):
        X = torch.randn(4 * cols, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
        H = X.T @ X / len(X)
        W = torch.randn(rows, cols, generator=g) * 0.03
        s = t.row_steps(t.finest_steps(W, 31), 0.02)
        q_g, q_r = t.gptq_quantize(W, H, s, 31), t.rtn_quantize(W, s, 31)
        assert q_g.shape == W.shape and int(q_g.abs().max()) <= 31
        err = lambda q: float((((W - q.float() * s.float()[:, None]) @ H) * (W - q.float() * s.float()[:, None])).sum())
        assert err(q_g) < 0.9 * err(q_r), (rows, cols)


def test_default_model_runs_lora_ttt_with_a_phase():
    """TTT_MODE=lora at the default shapes: the 11x512 model (recurrence on) with rank-96 adapters on every target,
    the 4096-wide head included, and one phase of whole-model SGD, on three short documents (one longer than the
    128-token window, so its later chunks are scored in capped windows)."""
    torch.manual_seed(0)
    model = t.GPT(t.ModelConfig())
    model.recur_active = True
    model.requires_grad_(False)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.r_[t.BOS_ID, rng.integers(2, 4096, k - 1)] for k in (130, 60, 90)] + [[5]])
    luts = (torch.ones(4096, dtype=torch.int16), torch.zeros(4096, dtype=torch.bool), torch.zeros(4096, dtype=torch.bool))
    hp = t.Hyperparameters.from_env(dict(TTT_ENABLED="1", TTT_MODE="lora", TTT_LORA_CHUNK_TOKENS="32", TTT_EPOCHS="1",
                                         TTT_LORA_BATCH_DOCS="2", TTT_PHASES="1", TTT_PREFIX_DOCS="1", EVAL_SEQ_LEN="128"))
    assert hp.ttt_lora_rank == 96 and hp.ttt_lora_targets == "q,k,v,o,up,down,head"
    lines = []
    r = t.evaluate_lora_ttt(t.Evaluator(tokens.astype(np.uint16), 128, 1024, luts, torch.device("cpu")), model, hp,
                            dump=True, log=lines.append)
    assert r["nll"].shape == (280,) and np.isfinite(r["nll"]).all()
    assert any(l.startswith("ttt_phase: 1/1 docs: 1 targets: 130 ") for l in lines), lines
    assert any(l.startswith("ttt_lora: window shapes: 3 (2 x [32, 64, 128])") for l in lines), lines
