"""Shared fixtures: a tiny SentencePiece tokenizer trained here on the embedded sample, and shards built
from it in the upstream layout (data/prepare.py), so every test runs offline on real text."""
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import prepare  # noqa: E402

TINY_VOCAB = 512


def sample_texts(n=None):
    with lzma.open(ROOT / "data" / "sample" / "docs.jsonl.xz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts if n is None else texts[:n]


@pytest.fixture(scope="session")
def tiny_vocab_size():
    return TINY_VOCAB


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """DATA_DIR with a 512-piece tokenizer trained on 120 sample docs; 12 val docs (~20k tokens) and
    train split into 25k-token shards so the loader sees several shards."""
    root = tmp_path_factory.mktemp("tiny")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(120)), encoding="utf-8")
    prepare.build(docs, root / "data", vocab_size=TINY_VOCAB, val_docs=12, shard_tokens=25_000, workers=1,
                  progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_sp(tiny_data_dir):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tiny_data_dir / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model"))


def tiny_cfg(**over):
    """A tiny ModelConfig with every path active: XSA, value embeddings, recurrence, parallel lanes, skips."""
    import train_gpt as t
    kw = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, xsa_last_n=3,
              ve_dim=8, ve_layers=(1, 2), recur_layers=(1,), parallel_start_layer=2, max_seq_len=64)
    kw.update(over)
    return t.ModelConfig(**kw)


def random_gpt(seed: int = 0, **over):
    """A tiny GPT (tiny_cfg) with non-trivial weights everywhere (the zero-init projections and the 0.005-std
    embedding would make it nearly uniform), recurrence on and no gradients, as the evaluations use it."""
    import torch
    import train_gpt as t
    torch.manual_seed(seed)
    model = t.GPT(tiny_cfg(**over))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 0.4)
            elif isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn_like(m.weight) * 0.15)
        for p in model.parameters():
            if p.ndim < 2:
                p.add_(torch.randn_like(p) * 0.1)
        for blk in model.blocks:  # ATTN_OUT_GATE's matrices (zero init: every gate 0.5)
            if blk.attn.gate is not None:
                blk.attn.gate.normal_(0, 1.0)
    model.recur_active = True
    model.requires_grad_(False)
    return model


def tiny_env(data_dir, out_dir, **over):
    """Env for a seconds-long CPU run of train_gpt.py on the tiny data."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DATA_DIR=str(data_dir), OUT_DIR=str(out_dir), VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="4",
               MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", TRAIN_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="1024", ITERATIONS="12", MAX_WALLCLOCK_SECONDS="0", RECUR_LAYERS="1,2",
               PARALLEL_START_LAYER="3", VE_LAYERS="2,3", XSA_LAST_N="4", VE_DIM="16", VAL_LOSS_EVERY="0",
               TRAIN_LOG_EVERY="4", EVAL_STRIDE="16", GPTQ_CALIBRATION_BATCHES="4", RUN_ID="tiny",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in over.items()})
    return env


def run_train(env, *args, timeout=300, script=None):
    """Run train_gpt.py (or a wrapped copy) as a subprocess; returns CompletedProcess with text output."""
    cmd = [sys.executable, str(script or ROOT / "train_gpt.py")] if not args else list(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def log_value(text, prefix, key):
    """The float after `key` on the last line starting with `prefix`."""
    import re
    lines = [l for l in text.splitlines() if l.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r}"
    m = re.search(re.escape(key) + r"\s*([-+0-9.eE]+)", lines[-1])
    assert m, f"{key!r} not in {lines[-1]!r}"
    return float(m.group(1))



def check_summary(out: str, mode: str) -> dict:
    """The last line is `summary: {strict JSON}`, and it agrees with the human-readable lines above it."""
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: "), last
    s = json.loads(last[len("summary: "):], parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    line = lambda prefix: next(l for l in out.splitlines() if l.startswith(prefix))
    assert s["mode"] == mode and s["run_id"] == line("run_id:").split()[1]
    assert s["code_sha256"] == line("code_sha256:").split()[1]
    assert s["code_bytes"] == int(line("Code size:").split()[2])
    assert s["total_bytes"] == int(line("Total submission size").split()[-2]) == s["model_bytes"] + s["code_bytes"]
    for name, r in s["scores"].items():
        assert f"{name} val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f} " in out, name
    assert s["val_bpb"] == s["scores"][s["score_line"]]["val_bpb"]
    assert s["eval_total_ms"] == pytest.approx(int(line("eval_total:").split()[1][:-2]), abs=2)
    assert s["env"]["data_fingerprint"] == line("env: data_fingerprint:").split()[2]
    hp = {l.split(":")[0].strip() for l in out.splitlines() if l.startswith("  ")}
    assert set(s["settings"]) <= hp
    if mode == "train":
        budget = line("training_budget:").split()
        assert (s["train_ms"], s["gptq_ms"]) == (int(budget[2]), int(budget[4]))
        assert s["steps"] == int(line("train_summary:").split()[2]) and s["stopped_early"] is False
        pre = line("pre-quantization post-ema")
        assert f"val_bpb:{s['pre_quant']['val_bpb']:.8f}" in pre
        trains = [l for l in out.splitlines() if " train_loss: " in l]
        assert [p[0] for p in s["curve"]["train"]] == [int(l.split("/")[0]) for l in trains]
        assert [f"{p[2]:.4f}" for p in s["curve"]["val"]] == [
            l.split("val_loss: ")[1].split()[0] for l in out.splitlines() if " val_loss: " in l]
        assert s["peak_memory_mib"]["allocated"] == int(line("peak memory allocated:").split()[3])
    return s
