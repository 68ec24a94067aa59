"""Parameter-golf trainer: SP4096, 11x512 GPT with depth recurrence and parallel residual lanes,
MuonEq-R, a 600 s wallclock loop, full-Hessian GPTQ int6 + Brotli export and exact sliding-window eval.

Pipeline, top to bottom: hyperparameters -> data -> tokenizer byte accounting -> model -> optimizer
-> training loop -> quantize/pack -> evaluation -> main (preflight, start_run, train_or_load, quantize,
write_artifact, final_evals, and the `summary:` line that ends every run).
Run:  torchrun --standalone --nproc_per_node=8 train_gpt.py   (env vars override every hyperparameter)
Smoke: SMOKE=1 python train_gpt.py                             (tiny config on the embedded sample)
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import glob
import hashlib
import heapq
import io
import json
import math
import os
import platform
import struct
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ============================================================================ hyperparameters

class ConfigError(ValueError):
    """An impossible setting, or missing/mismatched data, tokenizer, artifact or output folder: reported as one
    line before any GPU work, exit code 2, nothing written."""

# Every setting is declared once, below: its env var is the name in upper case, its type the default's (tuples:
# comma-separated layer indices; bools: 0/1). The README's settings table is generated from these lines
# (tests/test_settings.py), comments included.

@dataclasses.dataclass
class ModelConfig:
    """The network's shape and init: the model's settings, stored in the artifact's header."""
    vocab_size: int = 4096  # tokenizer pieces, 1..65536 (tokens are uint16)
    num_layers: int = 11  # >= 1
    model_dim: int = 512  # >= 1, a multiple of NUM_HEADS
    num_heads: int = 8  # >= 1
    num_kv_heads: int = 4  # grouped-query attention; >= 1, divides NUM_HEADS
    mlp_mult: float = 4.0  # MLP width / MODEL_DIM; > 0
    xsa_last_n: int = 11  # exclusive self-attention in the last N layers
    skip_gates_enabled: bool = True  # sigmoid gates on the U-Net skips
    logit_softcap: float = 30.0  # > 0
    rope_base: float = 10000.0  # > 0
    rope_dims: int = 16  # partial RoPE: rotated dims per head
    ln_scale: bool = True  # block inputs scaled by 1/sqrt(layer + 1)
    ve_dim: int = 128  # value-embedding width
    ve_layers: tuple = (9, 10)  # layers whose values get the value embedding
    qk_gain_init: float = 5.0  # any sign
    recur_layers: tuple = (4, 5)  # depth recurrence: repeated right after the last of them; empty: off
    recur_passes: int = 2  # how many times the recurrent layers run, >= 2 (2: repeated once)
    parallel_start_layer: int = 7  # first layer of the parallel residual lanes; 0: off
    max_seq_len: int = 2048  # not a setting: max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN), the RoPE tables' length
    tied_embed_init_std: float = 0.005
    smear_gate: bool = False  # SmearGate: each token's embedding mixes in the previous token's (never across a BOS)
    attn_out_gate: str = "0"  # 0|dense|sparse: per-head sigmoid gate on attention's output, from all or 12 input dims

    def __post_init__(self):  # JSON (the artifact header) turns tuples into lists
        self.ve_layers, self.recur_layers = tuple(self.ve_layers), tuple(self.recur_layers)

@dataclasses.dataclass
class Hyperparameters:
    """The run's settings; `model` holds the model's (ModelConfig). rank / world_size / local_rank come from
    torchrun's environment."""
    # run & paths
    data_dir: str = "./data/"  # DATA_DIR/datasets/fineweb10B_sp{VOCAB_SIZE}/ and DATA_DIR/tokenizers/
    train_files: str = ""  # glob; overrides the DATA_DIR layout
    val_files: str = ""  # glob; overrides the DATA_DIR layout
    tokenizer_path: str = ""  # overrides the DATA_DIR layout
    out_dir: str = "."  # artifacts go to OUT_DIR/, logs to OUT_DIR/logs/
    run_id: str = ""  # log name; empty: a uuid4
    seed: int = 1337  # init and data order; below 2^32
    # length & schedule
    iterations: int = 20000  # >= 1; step cap (the wallclock cap usually ends training first)
    warmdown_frac: float = 0.667  # in [0, 1]: LR falls linearly to MIN_LR over this last fraction of the budget
    warmup_steps: int = 20  # compile warmup; weights, optimizers and data are restored after it
    max_wallclock_seconds: float = 600.0  # > GPTQ_RESERVE_SECONDS; 0: run ITERATIONS and schedule by step
    min_lr: float = 0.0  # floor of the LR multiplier in the warmdown, in [0, 1]
    # batch & sequence
    train_batch_tokens: int = 786432  # per optimizer step, all ranks together: a positive multiple of 8 x TRAIN_SEQ_LEN
    train_seq_len: int = 2048  # tokens per training sequence; >= 1
    eval_seq_len: int = 0  # 0: TRAIN_SEQ_LEN (EVAL_ONLY: the artifact's)
    # logging & validation
    train_log_every: int = 500  # a train_loss line every N steps (and steps 1-5); 0: steps 1-5 only
    val_batch_tokens: int = 524288  # tokens per evaluation batch, all ranks together; >= 1
    val_loss_every: int = 4000  # 0: only at the end
    sliding_window_enabled: bool = True  # the scored eval; 0: the non-overlapping one is reported
    eval_stride: int = 64  # sliding-window stride, 1..EVAL_SEQ_LEN: scored tokens see >= EVAL_SEQ_LEN - stride context
    # architecture (the rest is the model's: ModelConfig)
    ve_enabled: bool = True  # value embeddings; 0: VE_LAYERS ignored
    recur_start_step: int = -1  # step that switches recurrence on; -1: use RECUR_START_FRAC
    recur_start_frac: float = 0.5  # in [0, 1]: fraction of the training budget that switches recurrence on
    # optimizer
    tied_embed_lr: float = 0.03
    matrix_lr: float = 0.02
    scalar_lr: float = 0.02
    muon_momentum: float = 0.99  # in [0, 1)
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_ns: str = "quintic"  # quintic|polar: Newton-Schulz coefficients (polar: Polar Express, per iteration)
    muon_momentum_warmup_start: float = 0.92  # in [0, 1)
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.09
    beta1: float = 0.9  # in [0, 1)
    beta2: float = 0.95  # in [0, 1)
    adam_eps: float = 1e-8  # > 0
    grad_clip_norm: float = 0.3  # 0: off
    adam_wd: float = 0.02
    embed_wd: float = 0.09
    ema_decay: float = 0.997  # in [0, 1)
    # devices
    attn_backend: str = "auto"  # auto|fa3|cudnn|flash|efficient|math (auto: the first that passes the probe)
    compile: str = "auto"  # auto|0|1 (auto: on for CUDA)
    # export
    gptq_enabled: bool = True  # 0: round-to-nearest
    gptq_calibration_batches: int = 64  # micro-batches, all ranks together; >= 1
    gptq_reserve_seconds: float = 10.0  # cut from the training budget for calibration and quantization
    artifact_bytes_limit: int = 16_000_000  # code + compressed model (>= 1); the rate search fills it
    export_only: str = ""  # a run's final_model.pt: calibrate, quantize, write and evaluate it again
    # evaluation
    eval_only: str = ""  # an artifact to evaluate
    dump_token_nll: str = ""  # path.npy for the per-target NLL of the reported evaluation
    ttt_enabled: bool = False  # score-first test-time training
    ttt_mode: str = "sgd"  # sgd: whole-model SGD after each stream chunk; lora: per-document LoRA + TTT_PHASES
    # whole-model TTT SGD (sgd mode: after each chunk; lora mode: after each phase)
    ttt_lr: float = 0.002
    ttt_epochs: int = 3  # passes over each chunk (lora: over everything scored so far, per phase)
    ttt_chunk_tokens: int = 32768  # sgd mode: targets scored between updates; >= 1
    ttt_freeze_blocks: int = 0  # 0..NUM_LAYERS
    ttt_momentum: float = 0.9  # in [0, 1)
    ttt_batch_seqs: int = 32  # EVAL_SEQ_LEN sequences per SGD step; >= 1
    ttt_grad_clip: float = 1.0
    # lora mode: per-document LoRA TTT, phases of whole-model SGD
    ttt_lora_rank: int = 96  # 0: no adapters (documents scored alone, no update)
    ttt_lora_targets: str = "q,k,v,o,up,down,head"  # adapted: q,k,v,o (attention), up,down (MLP), head
    ttt_lora_lr: float = 1e-4  # AdamW, betas (0, 0.999)
    ttt_lora_wd: float = 0.5
    ttt_lora_chunk_tokens: int = 64  # a document's targets scored before each LoRA step
    ttt_lora_batch_docs: int = 64  # documents side by side, sorted by length
    ttt_phases: int = 3  # phases over the first TTT_PREFIX_DOCS documents, whole-model SGD after each; 0: none
    ttt_prefix_docs: int = 2000
    # SLOT
    slot_enabled: bool = False  # context-only SLOT (a non-record evaluation)
    slot_steps: int = 8
    slot_lr: float = 0.005
    # convenience
    smoke: bool = False  # a one-minute CPU config on the embedded sample (SMOKE_OVERRIDES); env vars still win
    # not settings: the model's (ModelConfig), torchrun's ranks, and what the environment changed
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    non_default: dict = dataclasses.field(default_factory=dict)  # the settings the environment changed

    @staticmethod
    def declared() -> list:
        """(owner, field) of every setting, the run's first, then the model's."""
        return [(owner, f) for owner, cls in (("hp", Hyperparameters), ("model", ModelConfig))
                for f in dataclasses.fields(cls) if f.name not in NOT_SETTINGS]

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        env = dict(os.environ if env is None else env)
        if env.get("SMOKE", "0") not in ("", "0"):
            env = {**smoke_env(), **env}
        hp = cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                 local_rank=int(env.get("LOCAL_RANK", 0)))
        for owner, f in cls.declared():
            raw = env.get(f.name.upper())
            if raw is None:
                continue
            value = parse_setting(f.name, raw, f.default)
            setattr(hp.model if owner == "model" else hp, f.name, value)
            if value != f.default:
                hp.non_default[f.name] = value
        hp.eval_seq_len = hp.eval_seq_len or (0 if hp.eval_only else hp.train_seq_len)  # EVAL_ONLY: see preflight
        hp.validate()
        return hp

    def model_config(self) -> ModelConfig:
        """The model these settings build (VE_ENABLED=0 drops the value embeddings)."""
        m = self.model
        return dataclasses.replace(m, ve_dim=m.ve_dim if self.ve else 0, ve_layers=self.ve,
                                   max_seq_len=max(self.train_seq_len, self.eval_seq_len))

    @property
    def ve(self) -> tuple:
        return self.model.ve_layers if self.ve_enabled else ()

    @property
    def grad_accum(self) -> int:
        return 8 // self.world_size

    @property
    def train_seqs(self) -> int:  # sequences per optimizer step, all ranks together
        return self.train_batch_tokens // self.train_seq_len

    @property
    def use_compile(self) -> bool:
        return self.compile == "1" or (self.compile == "auto" and torch.cuda.is_available())

    def validate(self):
        """Raise ConfigError at the first impossible setting. Two rules cover every number, settings added later
        included: it is finite, and >= 0 unless a range below (or SIGNED) says otherwise."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        h, m, last = self, self.model, self.model.num_layers - 1
        get = lambda name: getattr(m if hasattr(m, name) else h, name)
        numbers = [f.name for _, f in self.declared() if type(f.default) in (int, float)]

        def each(names, ok, what):
            for name in names.split() if isinstance(names, str) else names:
                need(ok(get(name)), f"{name.upper()}={get(name)} must be {what}")
        each([n for n in numbers if type(get(n)) is float], math.isfinite, "a finite number")
        each("vocab_size num_layers model_dim num_heads num_kv_heads iterations train_batch_tokens train_seq_len "
             "val_batch_tokens eval_stride gptq_calibration_batches artifact_bytes_limit ttt_chunk_tokens "
             "ttt_batch_seqs ttt_lora_batch_docs ttt_lora_chunk_tokens muon_backend_steps", lambda v: v >= 1, "at least 1")
        each("warmdown_frac recur_start_frac min_lr", lambda v: 0 <= v <= 1, "in [0, 1]")
        each("ema_decay beta1 beta2 muon_momentum muon_momentum_warmup_start ttt_momentum", lambda v: 0 <= v < 1,
             "in [0, 1)")
        each("mlp_mult logit_softcap rope_base adam_eps", lambda v: v > 0, "> 0")
        each("recur_start_step", lambda v: v >= -1, ">= 0, or -1 (RECUR_START_FRAC decides)")
        each("seed", lambda v: v < 2**32, "below 2^32 (the data order reads 32 bits of it)")
        each([n for n in numbers if n not in SIGNED], lambda v: v >= 0, ">= 0")
        need(m.vocab_size <= 65536, f"VOCAB_SIZE={m.vocab_size} must fit uint16 tokens (<= 65536)")
        need(m.model_dim % m.num_heads == 0, f"MODEL_DIM={m.model_dim} is not divisible by NUM_HEADS={m.num_heads}")
        need(m.num_heads % m.num_kv_heads == 0, f"NUM_HEADS={m.num_heads} is not a multiple of NUM_KV_HEADS")
        need(int(m.mlp_mult * m.model_dim) >= 1, f"MLP_MULT={m.mlp_mult} gives no MLP unit at MODEL_DIM={m.model_dim}")
        hd = m.model_dim // m.num_heads
        need(m.rope_dims % 2 == 0 and m.rope_dims <= hd, f"ROPE_DIMS={m.rope_dims} must be even, <= {hd}")
        for name, layers in (("RECUR_LAYERS", m.recur_layers), ("VE_LAYERS", h.ve)):
            need(all(0 <= l <= last for l in layers), f"{name}={layers} has layers outside 0..{last}")
            need(list(layers) == sorted(set(layers)), f"{name}={layers} must list distinct layers in increasing order")
        need(m.parallel_start_layer <= last, f"PARALLEL_START_LAYER={m.parallel_start_layer} not in 0..{last}")
        need(m.ve_dim >= 1 or not h.ve, f"VE_DIM={m.ve_dim} must be at least 1 when VE_LAYERS are set")
        need(m.recur_passes >= 2, f"RECUR_PASSES={m.recur_passes} must be at least 2 (RECUR_LAYERS= turns it off)")
        need(m.attn_out_gate in ("0", "dense", "sparse"), f"ATTN_OUT_GATE={m.attn_out_gate} must be 0, dense or sparse")
        need(h.muon_ns in NS_COEFFS, f"MUON_NS={h.muon_ns} must be quintic or polar")
        need(h.muon_backend_steps == len(NS_COEFFS["polar"]) or h.muon_ns != "polar",
             f"MUON_NS=polar has coefficients for MUON_BACKEND_STEPS={len(NS_COEFFS['polar'])} only")
        need(h.world_size in (1, 2, 4, 8), f"WORLD_SIZE={h.world_size} must divide 8")
        need(h.train_batch_tokens % h.train_seq_len == 0,
             f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} is not a multiple of TRAIN_SEQ_LEN={h.train_seq_len}")
        need(h.train_seqs % 8 == 0, f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN={h.train_seqs} sequences must split into "
             "8 equal micro-batches (world_size x grad_accum = 8)")
        need(h.eval_stride <= (h.eval_seq_len or h.eval_stride),
             f"EVAL_STRIDE={h.eval_stride} must be at most EVAL_SEQ_LEN={h.eval_seq_len}")
        need(h.max_wallclock_seconds == 0 or h.max_wallclock_seconds > h.gptq_reserve_seconds,
             f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no time after GPTQ_RESERVE_SECONDS")
        need(h.attn_backend in ("auto", "math", *(ATTN_KINDS if torch.cuda.is_available() else ())),
             f"ATTN_BACKEND={h.attn_backend} must be auto|math, or fa3|cudnn|flash|efficient on a CUDA machine")
        need(h.attn_backend != "fa3" or _flash_attn_func is not None,
             f"ATTN_BACKEND=fa3 but FlashAttention-3 is not importable ({FA3_MISSING}): install flash_attn_interface "
             "(Hopper) or use ATTN_BACKEND=auto")
        need(h.compile in ("auto", "0", "1"), f"COMPILE={h.compile} must be auto, 0 or 1")
        need(h.ttt_freeze_blocks <= m.num_layers, f"TTT_FREEZE_BLOCKS={h.ttt_freeze_blocks} not in 0..NUM_LAYERS")
        need(h.ttt_mode in ("sgd", "lora"), f"TTT_MODE={h.ttt_mode} must be sgd or lora")
        need(set(h.ttt_lora_targets.split(",")) <= {*LORA_TARGETS, "head"},
             f"TTT_LORA_TARGETS={h.ttt_lora_targets} must be comma-separated names from q,k,v,o,up,down,head")
        need(h.ttt_lora_chunk_tokens <= (h.eval_seq_len if h.ttt_mode == "lora" and h.eval_seq_len else 1 << 30),
             f"TTT_LORA_CHUNK_TOKENS={h.ttt_lora_chunk_tokens} must be in 1..EVAL_SEQ_LEN")
        need(Path(h.run_id).name == h.run_id, f"RUN_ID={h.run_id!r} must be a file name (it names logs/RUN_ID.txt)")
        need(not (h.eval_only and h.export_only), "set EVAL_ONLY or EXPORT_ONLY, not both")

    def lines(self) -> list:
        """The log's settings block (upstream's format), then torchrun's rank and world size."""
        values = [(f.name, getattr(self.model if owner == "model" else self, f.name)) for owner, f in self.declared()]
        values += [(k, getattr(self, k)) for k in ("rank", "world_size", "local_rank")]
        return ["Hyperparameters:"] + [f"  {k}: {setting_text(v)}" for k, v in values]

NOT_SETTINGS = ("model", "rank", "world_size", "local_rank", "non_default", "max_seq_len")  # fields, not settings
SIGNED = ("recur_start_step", "qk_gain_init")  # the numbers that may be negative (validate: the others are >= 0)

# SMOKE=1: a one-minute CPU run on the embedded sample (data/prepare.py sample builds it); env vars still win.
SMOKE_OVERRIDES = dict(
    data_dir="data/smoke",
    out_dir="runs/smoke",
    num_layers=4,
    model_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_mult=2.0,
    train_seq_len=128,
    eval_seq_len=128,
    eval_stride=32,
    train_batch_tokens=4096,
    iterations=100000,
    max_wallclock_seconds=60.0,
    gptq_reserve_seconds=5.0,
    recur_layers=(1, 2),
    parallel_start_layer=3,
    ve_layers=(2, 3),
    xsa_last_n=4,
    val_loss_every=100,
    train_log_every=25,
    gptq_calibration_batches=8,
    val_batch_tokens=16384,
    muon_momentum_warmup_steps=100,
)

def setting_text(value) -> str:
    """A setting as the log block shows it (Python's True/False; layer lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

def env_text(value) -> str:
    """A setting as its env var spells it: booleans 0/1, layer lists (tuples, or JSON lists) comma-separated."""
    return ("1" if value else "0") if isinstance(value, bool) else setting_text(value)

def smoke_env() -> dict:
    """SMOKE_OVERRIDES as env vars."""
    return {k.upper(): env_text(v) for k, v in SMOKE_OVERRIDES.items()}

def parse_setting(name: str, raw: str, default):
    raw, kind = raw.strip(), type(default)
    try:
        if kind is tuple:
            return tuple(int(t) for t in raw.replace(" ", "").split(",") if t)
        if kind is bool:
            if raw.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.lower() in ("1", "true")
        return kind(raw)
    except ValueError:
        what = "a comma-separated list of layer indices" if kind is tuple else f"a valid {kind.__name__}"
        raise ConfigError(f"{name.upper()}={raw!r} is not {what}") from None

# ============================================================================ data

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1  # every document starts with it (the shard format, data/prepare.py)

class ShardError(ValueError):
    """A token shard that is missing, truncated or not in the challenge format."""

def read_shard_header(path) -> int:
    """Validate magic, version and exact file size; return the token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(SHARD_HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from None
    if header.size != SHARD_HEADER_INTS:
        raise ShardError(f"{path}: truncated header ({size} bytes, need {SHARD_HEADER_BYTES})")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: bad magic/version {header[0]}/{header[1]} "
                         f"(expected {SHARD_MAGIC}/{SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) "
                         f"but the file has {size} bytes")
    return n

def load_shard(path) -> np.ndarray:
    """Memory-map a validated shard's tokens as little-endian uint16."""
    n = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))

def data_paths(hp: Hyperparameters) -> tuple:
    """(train shard list, val shard list, tokenizer path), sorted by file name."""
    root = Path(hp.data_dir)
    ds = root / "datasets" / f"fineweb10B_sp{hp.model.vocab_size}"
    train = hp.train_files or str(ds / "fineweb_train_*.bin")
    val = hp.val_files or str(ds / "fineweb_val_*.bin")
    tok = hp.tokenizer_path or str(root / "tokenizers" / f"fineweb_{hp.model.vocab_size}_bpe.model")
    by_name = lambda pattern: sorted(glob.glob(pattern), key=lambda p: (Path(p).name, p))
    return by_name(train), by_name(val), tok

def shard_fingerprint(paths) -> str:
    """sha256 over names, sizes and headers: identifies the data without reading it."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(Path(p).name.encode() + struct.pack("<q", os.path.getsize(p)) + f.read(SHARD_HEADER_BYTES))
    return h.hexdigest()

class TrainStream:
    """Deterministic multi-shard stream of (seq_len+1)-token windows, split disjointly over ranks. Every rank
    runs the same sampler: each shard's seq_len blocks in a random order (random phase; reshuffled when used
    up); a step draws windows from shards in proportion to the blocks they have left, shuffles them, and rank
    r keeps windows r, r+W, ... The RNG depends on SEED and the shards' names and sizes, not on path spelling."""

    def __init__(self, paths, seq_len: int, global_seqs: int, rank: int, world: int, seed: int):
        self.tokens = [load_shard(p) for p in paths]
        self.seq_len, self.global_seqs, self.rank, self.world = seq_len, global_seqs, rank, world
        ident = hashlib.sha256("|".join(f"{Path(p).name}:{len(t)}" for p, t in zip(paths, self.tokens)).encode())
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [seed & 0xFFFFFFFF, int.from_bytes(ident.digest()[:8], "little")])))
        usable = [len(t) > seq_len + 1 for t in self.tokens]
        if not any(usable):
            raise ShardError(f"no training shard has more than seq_len+1={seq_len + 1} tokens")
        self.cursors = [self._new_cursor(i) if ok else None for i, ok in enumerate(usable)]

    def _new_cursor(self, i: int) -> list:
        """[window starts in a random order, how many are used]."""
        n = len(self.tokens[i])
        phase = int(self.rng.integers(0, min(self.seq_len, n - self.seq_len - 1)))
        return [phase + self.rng.permutation((n - 1 - phase) // self.seq_len) * self.seq_len, 0]

    def _take(self, i: int, k: int) -> list:
        starts = []
        while k > 0:
            order, used = c = self.cursors[i]
            m = min(k, len(order) - used)
            starts += [(i, int(s)) for s in order[used:used + m]]
            c[1], k = used + m, k - m
            if c[1] == len(order):
                self.cursors[i] = self._new_cursor(i)
        return starts

    def next_windows(self) -> list:
        """The (shard, start) windows of the next global batch that belong to this rank."""
        left = np.array([0 if c is None else len(c[0]) - c[1] for c in self.cursors], dtype=np.float64)
        counts = self.rng.multinomial(self.global_seqs, left / left.sum())
        windows = [w for i, k in enumerate(counts) if k for w in self._take(i, int(k))]
        order = self.rng.permutation(len(windows))
        return [windows[j] for j in order[self.rank::self.world]]

    def next_batch(self) -> torch.Tensor:
        """(global_seqs / world, seq_len + 1) int32 tokens for this rank."""
        L = self.seq_len + 1
        return torch.from_numpy(np.stack([self.tokens[i][s:s + L] for i, s in self.next_windows()]).astype(np.int32))

def load_val_tokens(paths, seq_len: int) -> np.ndarray:
    """All val shards concatenated, truncated to a whole number of seq_len windows plus one token."""
    tokens = np.concatenate([load_shard(p) for p in paths])
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise ShardError(f"validation has {len(tokens)} tokens, fewer than EVAL_SEQ_LEN+1={seq_len + 1}")
    return np.ascontiguousarray(tokens[:usable + 1])

# ============================================================================ tokenizer byte accounting

def build_byte_luts(sp, vocab_size: int) -> tuple:
    """Per-token (base_bytes, has_leading_space, is_boundary) for tokenizer-agnostic BPB:
    bytes(target) = base_bytes[target] + (has_space[target] and not is_boundary[previous token]). Control,
    unknown and unused ids are 0-byte boundaries; byte-fallback pieces are 1 byte; other pieces count the
    UTF-8 bytes of their text, a leading U+2581 becoming the space bit."""
    base = np.zeros(vocab_size, dtype=np.int16)
    space = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)
    for t in range(min(sp.get_piece_size(), vocab_size)):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        piece = sp.id_to_piece(t)
        if sp.is_byte(t):
            base[t] = 1
            continue
        if piece.startswith("\u2581"):
            space[t], piece = True, piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary)

def count_bytes(prev: torch.Tensor, tgt: torch.Tensor, luts) -> torch.Tensor:
    base, space, boundary = luts
    return base[tgt].long() + (space[tgt] & ~boundary[prev]).long()

# ============================================================================ model

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm that keeps the input's dtype (CUDA autocast computes rms_norm in fp32 and would
    hand back fp32, promoting the bf16 stream)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)

def causal_attention(q, k, v, backend: str):
    """q: (B,T,H,D), k/v: (B,T,Hkv,D) -> (B,T,H,D). SDPA's kernel is picked by the global backend flags."""
    if backend == "fa3":
        out = _flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if gqa and backend == "sdpa-expand":  # kernels without native GQA get repeated K/V
        rep = q.size(1) // k.size(1)
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)

GATE_DIMS = 12  # input dims read by SmearGate and the sparse attention output gate

def error_text(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"

try:  # FlashAttention-3 (Hopper), used when importable
    from flash_attn_interface import flash_attn_func as _flash_attn_func
    FA3_MISSING = ""
except Exception as e:  # not installed, or a broken build that fails while registering its ops: logged by the probe
    _flash_attn_func, FA3_MISSING = None, error_text(e)

def lora_delta(x, lora):
    """Batched per-row low-rank delta (LoRA TTT): row b of x (B, T, in) times A[b] (in, r) times B[b] (r, out)."""
    return (x @ lora[0]) @ lora[1]

class Linear(nn.Linear):
    """Bias-free nn.Linear through which every block projection runs: while LoRA TTT sets `lora` = (A, B), each
    batch row (a document) gets its own low-rank delta on top."""
    lora = None

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y if self.lora is None else y + lora_delta(x, self.lora)

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool):
        super().__init__()
        d, self.h, self.hkv, self.hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
        self.c_q = Linear(d, d)
        self.c_k = Linear(d, self.hkv * self.hd)
        self.c_v = Linear(d, self.hkv * self.hd)
        self.proj = Linear(d, d)
        self.proj.zero_init = True
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.xsa, self.rope_dims, self.backend = xsa, cfg.rope_dims, "sdpa"
        # output gate: head h scaled by sigmoid(W_h u[:k] / sqrt(k)); zero init (every gate 0.5)
        k = {"dense": d, "sparse": min(GATE_DIMS, d)}.get(cfg.attn_out_gate, 0)
        self.gate = nn.Parameter(torch.zeros(self.h, k)) if k else None
        half = cfg.rope_dims // 2
        inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / max(cfg.rope_dims, 1))
        ang = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def rope(self, x):
        """Partial RoPE on the first rope_dims of each head (halves rotated against each other)."""
        half, T = self.rope_dims // 2, x.size(1)
        if half == 0:
            return x
        cos, sin = self.cos[None, :T, None].to(x.dtype), self.sin[None, :T, None].to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

    def forward(self, u, ve=None):
        B, T, _ = u.shape
        q = self.c_q(u).view(B, T, self.h, self.hd)
        k = self.c_k(u).view(B, T, self.hkv, self.hd)
        v = self.c_v(u).view(B, T, self.hkv, self.hd)
        if ve is not None:
            v = v + ve.view(B, T, self.hkv, self.hd)
        q, k = self.rope(rms_norm(q)), self.rope(rms_norm(k))  # parameter-free QK-norm, then RoPE
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, self.backend)
        if self.xsa:  # exclusive self-attention: drop the component along the token's own value
            g = self.h // self.hkv
            vn = F.normalize(v, dim=-1).to(y.dtype).unsqueeze(3)  # autocast normalizes in fp32
            y = y.view(B, T, self.hkv, g, self.hd)
            y = y - (y * vn).sum(-1, keepdim=True) * vn
        if self.gate is not None:
            y = y.reshape(B, T, self.h, self.hd) * torch.sigmoid(self.gate_logits(u))[..., None]
        return self.proj(y.reshape(B, T, self.h * self.hd))

    def gate_logits(self, u):
        """(B, T, heads): s * W_h . u[:k], s = 1/sqrt(k). Sparse (k = 12) multiplies and sums elementwise: a
        12-deep matmul would only pad out a tensor-core tile (and inductor benchmarks such shapes when compiling)."""
        k = self.gate.size(1)
        if k == u.size(-1):
            return F.linear(u, self.gate) * k ** -0.5
        return (u[..., None, :k] * self.gate.to(u.dtype)).sum(-1) * k ** -0.5

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = Linear(cfg.model_dim, hidden)
        self.proj = Linear(hidden, cfg.model_dim)
        self.proj.zero_init = True

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.ln = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        if 0 < cfg.parallel_start_layer <= layer:
            # cross-lane routes (attn->mlp lane, mlp->attn lane); zero init = isolated lanes
            self.lane_route = nn.Parameter(torch.zeros(2))
        else:
            self.register_parameter("lane_route", None)

    def forward(self, x, x0, ve):
        mix = self.resid_mix.to(x.dtype)  # vectors cast to the stream's dtype: fp32 masters, bf16 stream on CUDA
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln)

    def forward_lanes(self, a, m, x0, ve):
        """Parallel residual lanes: attention reads lane a, the MLP reads lane m, learned cross-routes. A layer
        before PARALLEL_START_LAYER that recurrence repeats after the fork has no routes: isolated lanes."""
        mix = self.resid_mix.to(a.dtype)
        a = mix[0] * a + mix[1] * x0
        att = self.attn_scale.to(a.dtype) * self.attn(rms_norm(a) * self.ln, ve)
        mlp = self.mlp_scale.to(m.dtype) * self.mlp(rms_norm(m) * self.ln)
        if self.lane_route is None:
            return a + att, m + mlp
        return a + att + self.lane_route[1] * mlp, m + mlp + self.lane_route[0] * att

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, n, d = cfg, cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(n))
        # U-Net skips: layer s's output feeds layer n-1-s; pairs that would feed a layer its own
        # input (n-1-s <= s+1) are left out, so every skip row is used and gets a gradient.
        self.skip_pairs = [(s, n - 1 - s) for s in range(n) if n - 1 - s > s + 1]
        self.skip_into = {dst: j for j, (_, dst) in enumerate(self.skip_pairs)}
        self.skip_sources = {s for s, _ in self.skip_pairs}
        self.skip_weights = nn.Parameter(torch.ones(len(self.skip_pairs), d))
        self.skip_gates = nn.Parameter(torch.zeros(len(self.skip_pairs), d)) if cfg.skip_gates_enabled else None
        if cfg.ve_dim and cfg.ve_layers:
            kv_dim = cfg.num_kv_heads * (d // cfg.num_heads)
            self.ve_embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
            self.ve_proj = nn.Linear(cfg.ve_dim, kv_dim, bias=False)
            self.ve_scale = nn.Parameter(torch.tensor(0.1))
            self.ve_layer_scales = nn.Parameter(torch.ones(len(cfg.ve_layers)))
        self.ve_index = {l: i for i, l in enumerate(cfg.ve_layers)} if cfg.ve_dim else {}
        self.lanes_from = cfg.parallel_start_layer
        if self.lanes_from:
            self.lane_merge = nn.Parameter(torch.tensor(0.5))
        if cfg.smear_gate:  # zero init: the identity
            self.smear_w = nn.Parameter(torch.zeros(min(GATE_DIMS, d)))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        r = list(cfg.recur_layers)
        self.recur_order = list(range(n))
        if r:  # the recurrent layers run recur_passes times in a row, then the rest
            self.recur_order = list(range(r[-1] + 1)) + r * (cfg.recur_passes - 1) + list(range(r[-1] + 1, n))
        self.recur_active = False
        self.act_dtype = torch.float32  # the residual stream's dtype; build_model sets bf16 on CUDA (autocast)
        self.head_lora = None  # LoRA TTT: (A, B), a per-row low-rank delta on the logits, like Linear.lora
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        if hasattr(self, "ve_embed"):
            nn.init.normal_(self.ve_embed.weight, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight) if getattr(m, "zero_init", False) else nn.init.orthogonal_(m.weight)

    def layer_order(self) -> list:
        return self.recur_order if self.recur_active else list(range(self.cfg.num_layers))

    def _skip(self, x, l, outs):
        """Layer l's input with its U-Net skip added (unchanged when no skip feeds layer l)."""
        if l not in self.skip_into:
            return x
        j = self.skip_into[l]
        s = self.skip_weights[j].to(x.dtype) * outs[self.skip_pairs[j][0]]
        if self.skip_gates is None:
            return x + s
        g = torch.sigmoid(self.skip_gates[j]).to(x.dtype)
        return g * x + (1 - g) * s

    def embed(self, ids):
        """The normed embedding (fp32 table and norm, then the stream's dtype); with SMEAR_GATE, position t adds
        lambda * sigmoid(w . e_t[:12]) * e_{t-1}, except where token t is BOS: documents never mix."""
        e = rms_norm(self.tok_emb(ids)).to(self.act_dtype)
        if not self.cfg.smear_gate:
            return e
        logit = (e[..., :self.smear_w.numel()] * self.smear_w.to(e.dtype)).sum(-1)  # 12-deep: no matmul
        g = torch.sigmoid(logit) * self.smear_lambda.to(e.dtype)
        return e + (g * (ids != BOS_ID))[..., None] * F.pad(e[:, :-1], (0, 0, 1, 0))

    def hidden(self, ids):
        """Final normalized hidden state (B, T, d): the single-lane prefix, then (PARALLEL_START_LAYER > 0) the
        fork at the first position whose layer is >= PARALLEL_START_LAYER, every later position in lane mode."""
        x = x0 = self.embed(ids)
        ve_base = self.ve_proj(self.ve_embed(ids)) * self.ve_scale if self.ve_index else None
        ve = lambda l: ve_base * self.ve_layer_scales[self.ve_index[l]] if l in self.ve_index else None
        order, outs = self.layer_order(), {}
        fork = next((i for i, l in enumerate(order) if self.lanes_from and l >= self.lanes_from), len(order))
        for l in order[:fork]:
            v = ve(l)
            x = self.blocks[l](self._skip(x, l, outs), x0, v)
            if l in self.skip_sources:
                outs[l] = x
        if fork == len(order):
            return rms_norm(x)
        for i, l in enumerate(order[fork:]):
            v = ve(l)
            if i == 0:  # the fork: both lanes (attention's, the MLP's) start as one tensor, the layer's input
                a = m = self._skip(x, l, outs)
            else:
                a, m = self._skip(a, l, outs), self._skip(m, l, outs)
            a, m = self.blocks[l].forward_lanes(a, m, x0, v)
            if l in self.skip_sources:
                outs[l] = self._merge(a, m)
        return rms_norm(self._merge(a, m))

    def _merge(self, a, m):
        return self.lane_merge * a + (1 - self.lane_merge) * m

    def logits(self, h):
        """Tied head with the softcap c*tanh(z/c), fp32, written as 2c*sigmoid(2z/c) = c*tanh(z/c) + c: softmax
        ignores the constant, and sigmoid is ~6x cheaper than tanh on CPU, where eval is bound by the head."""
        z, c = F.linear(h, self.tok_emb.weight), self.cfg.logit_softcap
        z = (z if self.head_lora is None else z + lora_delta(h, self.head_lora)).float()
        if torch.is_grad_enabled():
            return 2 * c * torch.sigmoid(z * (2 / c))
        return z.mul_(2 / c).sigmoid_().mul_(2 * c)

    def forward(self, ids, targets):
        """Mean next-token cross-entropy (nats)."""
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def forward_nll(self, ids, targets, start: int = 0, rows: int = 0):
        """Per-position NLL of targets[:, start:] (positions before start only give context). The head runs on
        `rows` positions at a time (0: all), so CPU logits stay in cache."""
        h, y = self.hidden(ids)[:, start:].flatten(0, 1), targets[:, start:].flatten()
        rows = rows or len(y)
        return torch.cat([F.cross_entropy(self.logits(h[i:i + rows]), y[i:i + rows], reduction="none")
                          for i in range(0, len(y), rows)]).view_as(targets[:, start:])

def flops_per_token(model: GPT, recur: bool, seq_len: int) -> float:
    """Model FLOPs of one training token (MFU's numerator; README: MFU): 6 x the weights it multiplies through
    (recurrent passes counted, the tied head and attention output gates included) + 6 x layer passes x seq_len x d
    for causal attention (QK^T and AV over the causal half: 2 x seq_len x d forward, the backward twice that, no
    recompute)."""
    order = model.recur_order if recur else range(len(model.blocks))
    mats = sum(m.weight.numel() for l in order for m in model.blocks[l].modules() if isinstance(m, nn.Linear))
    mats += sum(model.blocks[l].attn.gate.numel() for l in order if model.blocks[l].attn.gate is not None)
    return 6 * (mats + model.tok_emb.weight.numel()) + 6 * len(order) * seq_len * model.cfg.model_dim

# ============================================================================ optimizer

NS_COEFFS = {  # MUON_NS: (a, b, c) per iteration of X <- a X + (b A + c A^2) X, A = X X^T
    "quintic": ((3.4445, -4.7750, 2.0315),),  # the same every iteration
    # Polar Express (Amsel et al. 2025; upstream #1344, #1787): minimax-optimal for each of 5 iterations
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}

def ns_coefficients(kind: str, steps: int) -> tuple:
    """(a, b, c) for each of `steps` iterations (polar: exactly its 5, see validate)."""
    return NS_COEFFS["polar"] if kind == "polar" else NS_COEFFS["quintic"] * steps

def newton_schulz(G: torch.Tensor, coeffs: tuple) -> torch.Tensor:
    """Approximate orthogonalization of a batch of matrices (B, r, c): one quintic iteration per (a, b, c)."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X

def muoneq_r_update(U: torch.Tensor, coeffs: tuple) -> torch.Tensor:
    """MuonEq-R: normalize each row, orthogonalize, rescale for non-square shapes."""
    U = U / U.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(U.dtype)
    X = newton_schulz(U, coeffs)
    return X * math.sqrt(max(1.0, U.size(-2) / U.size(-1)))

class Muon(torch.optim.Optimizer):
    """Nesterov momentum + MuonEq-R + decoupled weight decay. Matrices are orthogonalized in batches of one
    shape; matrix i is owned by rank i % world, and one flat all-reduce gives every rank all the updates."""

    def __init__(self, params, lr, momentum, ns, wd, rank=0, world=1, ns_fn=muoneq_r_update):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, ns=ns, wd=wd))  # ns: ns_coefficients
        self.rank, self.world, self.ns_fn = rank, world, ns_fn

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = group["params"]
            mom, lr, wd = group["momentum"], group["lr"], group["wd"]
            mine = [i for i in range(len(ps)) if i % self.world == self.rank]
            sizes = [p.numel() for p in ps]
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            dev = ps[0].device
            flat = torch.zeros(offsets[-1], device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
            by_shape = {}
            for i in mine:
                by_shape.setdefault(tuple(ps[i].shape), []).append(i)
            for idx in by_shape.values():
                for i in idx:
                    if "buf" not in self.state[ps[i]]:
                        self.state[ps[i]]["buf"] = torch.zeros_like(ps[i])
                grads, bufs = [ps[i].grad for i in idx], [self.state[ps[i]]["buf"] for i in idx]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                nesterov = torch._foreach_add(grads, bufs, alpha=mom)
                upd = self.ns_fn(torch.stack(nesterov), group["ns"])
                for i, u in zip(idx, upd):
                    flat[offsets[i]:offsets[i + 1]] = u.reshape(-1)
            if self.world > 1:
                dist.all_reduce(flat)
            torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_add_(ps, [flat[offsets[i]:offsets[i + 1]].view_as(p).to(p.dtype) for i, p in enumerate(ps)],
                                alpha=-lr)

def param_groups(model: GPT) -> tuple:
    """(matrices for Muon, embedding tables, everything else) - by module type, not by name."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    ps = list(model.parameters())
    return ([p for p in ps if id(p) in linear], [p for p in ps if id(p) in embed],
            [p for p in ps if id(p) not in linear and id(p) not in embed])

def build_optimizers(model: GPT, hp: Hyperparameters, ns_fn=muoneq_r_update) -> list:
    mats, embeds, scalars = param_groups(model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, **fused)
    opts = [Muon(mats, hp.matrix_lr, hp.muon_momentum_warmup_start, ns_coefficients(hp.muon_ns, hp.muon_backend_steps),
                 hp.muon_wd, hp.rank, hp.world_size, ns_fn),
            torch.optim.AdamW(embeds, lr=hp.tied_embed_lr, weight_decay=hp.embed_wd, **adam),
            torch.optim.AdamW(scalars, lr=hp.scalar_lr, weight_decay=hp.adam_wd, **adam)]
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts

def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Flat, then linear to zero over the last warmdown_frac of the budget (floored at min_lr)."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)

def muon_momentum(step: int, hp: Hyperparameters) -> float:
    t = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return hp.muon_momentum_warmup_start + t * (hp.muon_momentum - hp.muon_momentum_warmup_start)

class EMA:
    """fp32 shadow of every parameter. The decay warms up as min(decay, (1+t)/(10+t)), so a short
    run is not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.t = decay, 0
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.t) / (10 + self.t))

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.current_decay())
        self.t += 1

    @torch.no_grad()
    def apply_to(self, model: nn.Module):
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(p.dtype))

# ============================================================================ training loop

class Diverged(RuntimeError):
    """Training or a score went non-finite, seen by every rank at the same point: one `error:` line, exit code 1,
    no checkpoint or artifact left (an artifact whose own evaluation is non-finite is removed)."""

class AgreedClock:
    """Elapsed training time, and which ranks' losses went non-finite, agreed by all ranks with no host sync per
    step: each step's host-measured time and one non-finite-loss flag per rank ride in one tensor, all-reduced (MAX)
    on the device and read back `lag` steps later, so every rank derives the same LR, recurrence switch and stop
    decision, and every rank sees a divergence at the same step."""

    def __init__(self, device: torch.device, world: int, rank: int = 0, lag: int = 2):
        self.device, self.world, self.rank = device, world, rank
        self.lag = lag if device.type == "cuda" else 0
        self.pending, self.value, self.value_step = [], 0.0, 0
        self.last_finite = torch.full((), math.nan, device=device)  # this rank's last finite loss, on the device
        self.diverged = None  # (first step with a non-finite loss, [its ranks], this rank's last finite loss)

    def push(self, step: int, ms: float, loss: torch.Tensor):
        cuda = self.device.type == "cuda"
        finite = torch.isfinite(loss)
        self.last_finite = torch.where(finite, loss.float(), self.last_finite)
        t = torch.zeros(1 + self.world, dtype=torch.float64, pin_memory=cuda)
        t[0] = ms
        t = t.to(self.device, non_blocking=True)
        t[1 + self.rank] = (~finite).to(torch.float64)  # on the device: no sync
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = torch.empty(1 + self.world, dtype=torch.float64, pin_memory=cuda).copy_(t, non_blocking=cuda)
        ev = torch.cuda.Event() if cuda else None
        if cuda:
            ev.record()
        self.pending.append((step, out, ev, self.last_finite))
        while len(self.pending) > self.lag:
            self._read(*self.pending.pop(0))

    def _read(self, step: int, out: torch.Tensor, ev, last_finite: torch.Tensor):
        if ev is not None:
            ev.synchronize()  # recorded `lag` steps ago: the GPU has long passed it
        self.value, *flags = out.tolist()
        self.value_step = step
        if any(flags) and self.diverged is None:
            self.diverged = (step, [r for r, bad in enumerate(flags) if bad], last_finite.item())

    def flush(self):
        """Read back every pending step (where the loop syncs anyway: validation, the end of training)."""
        while self.pending:
            self._read(*self.pending.pop(0))

    def estimate(self, step: int) -> float:
        """Agreed elapsed time extrapolated to `step` by the mean step time so far."""
        return self.value * step / self.value_step if self.value_step else self.value

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def autocast_ctx(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

def to_device(t: torch.Tensor, device) -> torch.Tensor:
    return (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t).long()

def train_step(model, base, opts, tokens, hp, step: int, lr_mult: float, device):
    """One optimizer step over grad_accum micro-batches; returns the mean loss as a device tensor."""
    accum = hp.grad_accum
    total = torch.zeros((), device=device)
    for i, mb in enumerate(tokens.chunk(accum)):
        defer = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and i < accum - 1 \
            else nullcontext()
        with defer:
            with autocast_ctx(device):
                loss = model(mb[:, :-1], mb[:, 1:])
            (loss / accum).backward()
        total += loss.detach()
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
    opts[0].param_groups[0]["momentum"] = muon_momentum(step, hp)
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(base.parameters(), hp.grad_clip_norm)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / accum

def peak_memory(device) -> dict:
    """Peak MiB allocated and reserved by CUDA (CPU: the max RSS for both)."""
    if device.type == "cuda":
        return dict(allocated=torch.cuda.max_memory_allocated(device) // 2**20,
                    reserved=torch.cuda.max_memory_reserved(device) // 2**20)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return dict(allocated=rss, reserved=rss)

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peak per GPU (datasheets), by torch.cuda.get_device_name exactly
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}

def peak_flops(device) -> float:
    """MFU's denominator per GPU (logged as env: peak_bf16_tflops); 0 when the device is not in the table."""
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device), 0.0) if device.type == "cuda" else 0.0

def compile_warmup(hp, base: GPT, model, device, make_stream, log, ns_fn):
    """WARMUP_STEPS real steps that compile the training graphs (the second half with recurrence on) before the
    timer starts; the weights are restored afterwards, and the caller rebuilds the optimizers and the stream."""
    saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
    opts, stream = build_optimizers(base, hp, ns_fn), make_stream()
    switch = hp.warmup_steps // 2 if base.cfg.recur_layers else hp.warmup_steps
    for i in range(hp.warmup_steps):
        base.recur_active = i >= switch
        train_step(model, base, opts, to_device(stream.next_batch(), device), hp, i, 1.0, device)
        if i + 1 <= 6 or (i + 1) % 10 == 0 or i + 1 == hp.warmup_steps:
            log(f"warmup_step: {i + 1}/{hp.warmup_steps}")
    base.load_state_dict(saved)
    base.recur_active = False

@dataclasses.dataclass
class TrainResult:
    steps: int
    train_ms: float  # timed training (compile warmup and validation excluded)
    stopped_early: bool  # by the wallclock cap
    peak_memory_mib: dict
    curve: dict  # train: [step, train_ms, loss, tok/s] per train_loss line; val: [step, train_ms, loss, bpb]

def train(hp, base: GPT, model, device, make_stream, val_fn, log, ns_fn=muoneq_r_update) -> TrainResult:
    """Compile warmup (both graphs), then the wallclock-capped loop; val_fn() scores `base`. Leaves the EMA in
    `base`. Raises Diverged on every rank, within AgreedClock's lag, once a rank's loss is NaN or infinite."""
    use_recur = bool(base.cfg.recur_layers)
    if hp.use_compile and hp.warmup_steps > 0:
        compile_warmup(hp, base, model, device, make_stream, log, ns_fn)
    opts, stream = build_optimizers(base, hp, ns_fn), make_stream()
    ema = EMA(base, hp.ema_decay)
    cap_ms = 1000 * (hp.max_wallclock_seconds - hp.gptq_reserve_seconds) if hp.max_wallclock_seconds > 0 else 0
    log(f"gptq:reserving {hp.gptq_reserve_seconds:g}s, effective={cap_ms:.0f}ms" if cap_ms else "wallclock: no cap")
    clock = AgreedClock(device, hp.world_size, hp.rank)
    flops = {r: flops_per_token(base, r, hp.train_seq_len) for r in (False, True)}
    step, stop, train_ms, total_flops = 0, False, 0.0, 0.0
    curve, mults = dict(train=[], val=[]), {}  # mults: the LR multiplier of each step, for the divergence report

    def check():
        if clock.diverged:
            bad, ranks, loss0 = clock.diverged
            lrs = " ".join(f"{k} {v * mults[bad]:.4g}" for k, v in (("matrix", hp.matrix_lr), ("tied_embed",
                           hp.tied_embed_lr), ("scalar", hp.scalar_lr)))
            on = f" on rank {','.join(map(str, ranks))}" if hp.world_size > 1 else ""
            mine = " (rank 0's)" if hp.world_size > 1 else ""
            raise Diverged(f"training diverged: train_loss is not finite at step {bad}/{iters}{on} (last finite "
                           f"train_loss{mine}: {f'{loss0:.4f}' if math.isfinite(loss0) else 'none'}); learning rates "
                           f"at that step{mine}: {lrs}; nothing written")
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiles, g0 = 0, graphs()  # graphs compiled inside the timed loop (paused validation excluded)
    tokens_per_step, iters = hp.train_batch_tokens, hp.iterations
    sync(device)
    t0 = time.perf_counter()
    next_tokens = to_device(stream.next_batch(), device)
    while True:
        last = step == iters or stop
        if last or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            sync(device)
            clock.flush()
            check()
            train_ms += 1000 * (time.perf_counter() - t0)
            compiles += graphs() - g0
            if stop:
                log(f"stopping_early: wallclock_cap train_time: {train_ms:.0f}ms step: {step}/{iters}")
            r = val_fn()
            log(f"{step}/{iters} val_loss: {r['loss']:.4f} val_bpb: {r['bpb']:.4f} train_time: {train_ms / 60000:.2f}m")
            curve["val"].append([step, round(train_ms), r["loss"], r["bpb"]])
            sync(device)
            g0, t0 = graphs(), time.perf_counter()
        if last:
            break
        frac = clock.estimate(step) / cap_ms if cap_ms else step / iters
        if use_recur and not base.recur_active and (
                step >= hp.recur_start_step if hp.recur_start_step >= 0 else frac >= hp.recur_start_frac):
            base.recur_active = True
            log(f"recurrence:activated at step {step}, virtual_layers={base.recur_order}")
        mults[step + 1] = lr_multiplier(frac, hp.warmdown_frac, hp.min_lr)
        loss = train_step(model, base, opts, next_tokens, hp, step, mults[step + 1], device)
        ema.update()
        total_flops += flops[base.recur_active] * tokens_per_step
        step += 1
        if step < iters:
            next_tokens = to_device(stream.next_batch(), device)  # host work overlaps the queued step
        now_ms = train_ms + 1000 * (time.perf_counter() - t0)
        clock.push(step, now_ms, loss)
        if step <= 5 or (hp.train_log_every > 0 and step % hp.train_log_every == 0):
            sync(device)
            now_ms = train_ms + 1000 * (time.perf_counter() - t0)
            tok_s, train_loss = step * tokens_per_step / (now_ms / 1000), loss.item()
            log(f"{step}/{iters} train_loss: {train_loss:.4f} train_time: {now_ms / 60000:.2f}m tok/s: {tok_s:.0f}")
            curve["train"].append([step, round(now_ms), train_loss, round(tok_s)])
        check()
        if cap_ms and clock.estimate(step) >= cap_ms:
            stop = True
    peak = peak_memory(device)
    log(f"peak memory allocated: {peak['allocated']} MiB reserved: {peak['reserved']} MiB"
        + (" (cpu max rss)" if device.type != "cuda" else ""))
    tok_s = step * tokens_per_step / max(train_ms / 1000, 1e-9)
    peak_all = peak_flops(device) * hp.world_size
    mfu = f"{100 * total_flops / (train_ms / 1000) / peak_all:.1f}%" if peak_all else "n/a"
    log(f"train_summary: steps: {step} train_time: {train_ms:.0f}ms tok/s: {tok_s:.0f} mfu: {mfu} "
        f"timed_compiles: {compiles}")
    if compiles:
        log(f"WARNING: {compiles} graph(s) compiled inside the timed loop; see TORCH_LOGS=recompiles")
    log("ema:applying EMA weights")
    ema.apply_to(base)
    return TrainResult(step, train_ms, stop, peak, curve)

# ============================================================================ quantize / pack

QMAX = {"int6": 31, "int8": 127}  # code range per kind; codes are stored one per byte either way
ARTIFACT_MAGIC = b"PGQ1"
BROTLI_CHUNK = 4 << 20  # independent Brotli streams, compressed in parallel
FIT_TARGET, FIT_BAND = 0.997, (0.995, 0.999)  # the rate search's aim and accepted band (fractions of its budget)
GPTQ_PASSES = 2  # per search, at most: the second solves every matrix again on the corrected grid

class FitError(RuntimeError):
    """The artifact cannot be brought under ARTIFACT_BYTES_LIMIT."""

def quant_plan(model: GPT) -> dict:
    """name -> 'int6' (Linear weights, GPTQ), 'int8' (embedding tables), 'fp16' (vectors and scalars)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: "int6" if id(p) in linear else "int8" if id(p) in embed else "fp16" for n, p in model.named_parameters()}

@contextmanager
def exact_fp32():
    """TF32 off for the Hessians and the GPTQ solves, so a GPU computes the codes a CPU would."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)

@torch.no_grad()
def collect_hessians(model: GPT, batches, device, world: int) -> dict:
    """name -> H = mean over calibration batches (all ranks) of X^T X, X the input of that int6 Linear."""
    plan, hs = quant_plan(model), {}

    def hook(name):
        def add(_mod, args):
            x = args[0].reshape(-1, args[0].size(-1)).float()
            if name not in hs:
                hs[name] = torch.zeros(x.size(1), x.size(1), device=device)
            hs[name].addmm_(x.T, x)
        return add
    hooks = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules()  # c_k, c_v: below
             if isinstance(m, nn.Linear) and plan[f"{n}.weight"] == "int6" and not n.endswith((".c_k", ".c_v"))]
    count = torch.zeros((), device=device)
    with exact_fp32():
        for tokens in batches:
            with autocast_ctx(device):
                model.hidden(to_device(tokens, device)[:, :-1])
            count += 1
    for h in hooks:
        h.remove()
    for t in [count, *hs.values()] if world > 1 else []:
        dist.all_reduce(t)
    hs = {n: H / count for n, H in hs.items()}  # c_k and c_v read c_q's input: they share its Hessian
    return {**hs, **{n.replace(".c_q.", c): H for n, H in hs.items() if ".c_q." in n for c in (".c_k.", ".c_v.")}}

def finest_steps(W: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row, the finest step whose grid covers the row: row max / qmax."""
    return W.abs().amax(dim=1).float() / qmax

def row_steps(finest: torch.Tensor, knob: float) -> torch.Tensor:
    """Per-row step: the row's finest step, or the knob when coarser; rounded to fp16 as stored."""
    return finest.clamp_min(max(knob, 1e-7)).half()

def rtn_quantize(W: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round to nearest on the per-row grid: int8 codes."""
    return torch.clamp(torch.round(W.float() / step.float()[:, None]), -qmax, qmax).to(torch.int8)

def gptq_quantize(W: torch.Tensor, H: torch.Tensor, step: torch.Tensor, qmax: int, block: int = 128,
                  damp: float = 0.01) -> torch.Tensor:
    """Full-Hessian GPTQ on a given per-row grid: act-order, 1% damping, lazy block updates. int8 codes."""
    W, H = W.float().clone(), H.float().clone()
    cols = W.size(1)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True)
    L, info = torch.linalg.cholesky_ex(H[perm][:, perm])
    if info.item() != 0:
        return rtn_quantize(W, step, qmax)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    W, s = W[:, perm], step.float()[:, None]
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Ub = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i:i + 1]
            q = torch.clamp(torch.round(w / s), -qmax, qmax)
            Q[:, i1 + i:i1 + i + 1] = q
            err = (w - q * s) / Ub[i, i]
            W1[:, i:] -= err * Ub[i:i + 1, i:]
            E1[:, i:i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8)

def huffman_bits(counts) -> int:
    """Length in bits of an optimal prefix code over these symbol counts (0 for a single symbol)."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total

def predicted_code_bytes(q: torch.Tensor, rows=None) -> float:
    """Brotli bytes of a tensor's codes. Brotli codes literals with prefix codes, so i.i.d. codes cost their
    Huffman length (measured: within 0.05% above 1.4 bits per code). Below ~1.2 bits, runs of zeros become
    copies and Brotli needs about 1.25 x the entropy + 0.01 bit (measured on rounded Gaussians). `rows`, a
    boolean mask, splits the rows into two groups costed apart (Brotli's block splitting adapts likewise)."""
    if rows is not None and 0 < int(rows.sum()) < len(rows):
        return predicted_code_bytes(q[rows]) + predicted_code_bytes(q[~rows])
    counts = torch.bincount(q.reshape(-1).long() + 128, minlength=256)
    p = counts[counts > 0].double() / q.numel()
    entropy = float(-(p * p.log2()).sum()) * q.numel()
    return min(huffman_bits(counts.tolist()), 1.25 * entropy + 0.01 * q.numel()) / 8

class RateSearch:
    """Chooses one grid knob c for every quantized tensor: row step = max(row max / qmax, c), an absolute step
    (at equal bytes it beat steps relative to each row's spread, or scaled by Hessian or Fisher estimates of a
    layer's sensitivity; see the README). c = 0 is the finest grid; otherwise the search puts the predicted
    artifact into FIT_BAND of the budget.
    Round-to-nearest predictions (cheap) place c; GPTQ passes then correct it by the measured ratio of GPTQ
    to RTN code bytes. Solves are spread over ranks (largest first) and predictions all-reduced, so every
    rank takes the same decisions."""

    def __init__(self, model: GPT, hessians: dict, use_gptq: bool, rank: int, world: int):
        self.cfg, self.hessians, self.use_gptq, self.rank, self.world = model.cfg, hessians, use_gptq, rank, world
        self.plan = quant_plan(model)
        self.sd = {n: p.detach() for n, p in model.named_parameters()}
        self.names = [n for n, k in self.plan.items() if k != "fp16"]
        self.owner, load = {}, [0] * world
        for n in sorted(self.names, key=lambda n: -self.sd[n].numel() * self.sd[n].size(1)):
            self.owner[n] = load.index(min(load))
            load[self.owner[n]] += self.sd[n].numel() * self.sd[n].size(1)
        self.mine = [n for n in self.names if self.owner[n] == rank]
        self.finest = {n: finest_steps(self.sd[n], QMAX[self.plan[n]]) for n in self.names}
        self.fp16 = {n: dict(kind="fp16", data=self.sd[n].half()) for n, k in self.plan.items() if k == "fp16"}
        self.brotli_ratio = dict.fromkeys(self.names, 1.0)  # measured Brotli / Huffman bytes, see calibrate
        self.evals = self.passes = 0

    def steps(self, c: float) -> dict:
        return {n: row_steps(self.finest[n], c) for n in self.names}

    def code_bytes(self, n: str, q: torch.Tensor, c: float) -> float:
        """Predicted bytes of tensor n's codes at knob c: rows on the knob's grid and rows on their own finest
        grid have different code distributions, so they are costed apart."""
        return predicted_code_bytes(q, c >= self.finest[n]) * self.brotli_ratio[n]

    def quantize(self, n: str, step: torch.Tensor, gptq: bool) -> torch.Tensor:
        H = self.hessians.get(n)
        if gptq and self.use_gptq and H is not None:
            with exact_fp32():
                return gptq_quantize(self.sd[n], H, step, QMAX[self.plan[n]])
        return rtn_quantize(self.sd[n], step, QMAX[self.plan[n]])

    def side_bytes(self, steps: dict) -> int:
        """Header, scales and fp16 tensors compressed, with the container's framing for every chunk (Brotli q5:
        cheap, and within a few kB of q11 on these small streams)."""
        empty = {n: dict(kind=self.plan[n], q=torch.empty(0, dtype=torch.int8), scale=steps[n]) for n in self.names}
        code_chunks = sum(math.ceil(sum(self.sd[n].numel() for n in self.names if self.plan[n] == k) / BROTLI_CHUNK)
                          for k in ("int6", "int8"))
        return len(compress(pack_artifact({**empty, **self.fp16}, self.cfg), quality=5)) + 4 * code_chunks

    def predict(self, c: float, gptq: bool) -> tuple:
        """(predicted model bytes, bytes of the side streams, this rank's codes) at knob c."""
        steps = self.steps(c)
        codes = {n: self.quantize(n, steps[n], gptq) for n in self.mine}
        local = torch.tensor([sum(self.code_bytes(n, q, c) for n, q in codes.items())],
                             dtype=torch.float64, device=self.sd[self.names[0]].device)
        if self.world > 1:
            dist.all_reduce(local)
        self.evals += not gptq
        self.passes += gptq
        side = self.side_bytes(steps)
        return side + local.item(), side, codes

    def calibrate(self, c: float):
        """Embedding tables are not i.i.d. row by row (rare tokens' rows nearly coincide), and Brotli's matches
        exploit it: their ratio to the Huffman estimate is measured once by compressing them for real. Matrix
        codes are i.i.d. enough for the estimate (+0.1%)."""
        import brotli
        steps = self.steps(c)
        for n in self.mine:
            if self.plan[n] == "int8":
                q = self.quantize(n, steps[n], False)
                est = self.code_bytes(n, q, c) / self.brotli_ratio[n]
                if est > 0:
                    self.brotli_ratio[n] = len(brotli.compress(q.cpu().numpy().tobytes(), quality=11, lgwin=24)) / est

    def solve(self, size_at, target: float, lo: float, hi: float) -> float:
        """c in [lo, hi] where size_at(c) ~ target (size falls as c grows): Illinois false position on log c."""
        x0, x1 = math.log(lo), math.log(hi)
        f0, f1 = math.log(size_at(lo) / target), math.log(size_at(hi) / target)
        if f0 <= 0 or f1 >= 0:
            return lo if f0 <= 0 else hi
        last = 0
        for _ in range(40):
            x = x1 - f1 * (x1 - x0) / (f1 - f0)
            f = math.log(size_at(math.exp(x)) / target)
            if abs(f) < 5e-4 or x1 - x0 < 1e-6:
                return math.exp(x)
            if f > 0:
                x0, f0 = x, f
                f1 = f1 / 2 if last == 1 else f1
                last = 1
            else:
                x1, f1 = x, f
                f0 = f0 / 2 if last == -1 else f0
                last = -1
        return math.exp(x1)

    def run(self, budget: int) -> tuple:
        """(entries, knob c, predicted model bytes). budget = ARTIFACT_BYTES_LIMIT minus the code bytes."""
        if budget <= 0:
            raise FitError(f"code alone is over ARTIFACT_BYTES_LIMIT (by {-budget} bytes)")
        target = budget * FIT_TARGET
        rtn = lambda c: self.predict(c, False)[0]
        # below c_lo no floor binds (the finest grid); from c_hi on every code rounds to zero
        c_lo = min(float(self.finest[n].min()) for n in self.names)
        c_hi = max(float(2 * QMAX[self.plan[n]] * self.finest[n].max()) for n in self.names)
        c_lo = max(c_lo, c_hi * 1e-6)
        smallest = rtn(c_hi)
        if smallest > budget:
            raise FitError(f"even all-zero codes need {smallest:.0f} model bytes, more than the {budget} left")
        finest_fits = lambda: rtn(0.0) <= budget * FIT_BAND[1]
        c = 0.0 if finest_fits() else self.solve(rtn, target, c_lo, c_hi)
        self.calibrate(c)
        c = 0.0 if finest_fits() else self.solve(rtn, target, c_lo, c_hi)
        best = None
        for _ in range(GPTQ_PASSES if self.use_gptq else 1):
            size, side, codes = self.predict(c, True)
            fits = size <= budget * FIT_BAND[1]
            if fits and (best is None or size > best[2]):
                best = (codes, c, size)
            if fits and (c == 0.0 or size >= budget * FIT_BAND[0]):
                break
            # GPTQ's code bytes differ from RTN's on the same grid by a near-constant ratio: correct by it
            ratio = (size - side) / max(rtn(c) - side, 1.0)
            c = self.solve(lambda x: (lambda p, s: s + ratio * (p - s))(*self.predict(x, False)[:2]), target,
                           c_lo, c_hi)
        codes, c, size = best or (codes, c, size)  # nothing fitted: export_model measures and corrects
        return self.entries(codes, c), c, size

    def report(self, entries: dict, c: float, predicted_total: float, limit: int) -> list:
        """Log lines (rank 0): the knob, predicted bits per weight by kind, the Hessian-weighted error."""
        if self.rank != 0:
            return []
        bits, count, err, ref = {}, {}, 0.0, 0.0
        for n, e in entries.items():
            k = e["kind"]
            w = self.sd[n].float()
            bits[k] = bits.get(k, 0.0) + (16 * w.numel() if k == "fp16" else 8 * self.code_bytes(n, e["q"], c))
            count[k] = count.get(k, 0) + w.numel()
            if n in self.hessians and k != "fp16":
                H, D = self.hessians[n].float(), w - e["q"].float() * e["scale"].float()[:, None]
                err += float(((D @ H) * D).sum())
                ref += float(((w @ H) * w).sum())
        return [f"quant:grid knob: {c:.6g} (row step = max(row max / qmax, knob); 0 = finest grid) "
                f"rtn_evals: {self.evals} gptq_passes: {self.passes}",
                "quant:bits_per_weight " + " ".join(f"{k}: {bits[k] / count[k]:.3f}" for k in bits),
                f"quant:hessian_weighted_error: {err / max(ref, 1e-30):.4e} (relative, int tensors with a Hessian)",
                f"quant:predicted total: {predicted_total:.0f} bytes ({100 * predicted_total / limit:.2f}% of "
                f"ARTIFACT_BYTES_LIMIT)"]

    def entries(self, codes: dict, c: float) -> dict:
        """name -> entry, in state-dict order; every rank gets every tensor's codes from its owner."""
        steps, out = self.steps(c), {}
        for n, kind in self.plan.items():
            if kind == "fp16":
                out[n] = self.fp16[n]
                continue
            q = codes.get(n, torch.empty(self.sd[n].shape, dtype=torch.int8, device=self.sd[n].device))
            if self.world > 1:
                dist.broadcast(q, src=self.owner[n])
            out[n] = dict(kind=kind, q=q, scale=steps[n])
        return out

def dequantize_entries(entries: dict) -> dict:
    return {n: e["data"].float() if e["kind"] == "fp16" else e["q"].float() * e["scale"].float()[:, None]
            for n, e in entries.items()}

STREAMS = ("int6", "int8", "scale", "fp16")  # body sections, in order

def pack_artifact(entries: dict, cfg: ModelConfig) -> bytes:
    """Our own flat format (no pickle): magic, JSON header, then one section per stream so similar bytes sit
    together: int6 codes, int8 codes, fp16 scales, fp16 tensors (fp16 as byte planes: all low bytes, then all
    high bytes, which Brotli compresses better)."""
    parts = {k: [] for k in STREAMS}
    for e in entries.values():
        if e["kind"] == "fp16":
            parts["fp16"].append(e["data"])
        else:
            parts[e["kind"]].append(e["q"])
            parts["scale"].append(e["scale"])
    raw = lambda ts: b"".join(t.detach().contiguous().cpu().numpy().tobytes() for t in ts)
    planes = lambda b: np.frombuffer(b, np.uint8).reshape(-1, 2).T.tobytes()
    body = [raw(parts[k]) if k.startswith("int") else planes(raw(parts[k])) for k in STREAMS]
    header = json.dumps(dict(config=dataclasses.asdict(cfg), sections=[len(b) for b in body], tensors=[
        [n, e["kind"], list((e["data"] if e["kind"] == "fp16" else e["q"]).shape)] for n, e in entries.items()]))
    return ARTIFACT_MAGIC + struct.pack("<I", len(header)) + header.encode() + b"".join(body)

def artifact_header(blob: bytes) -> tuple:
    """(JSON header, offset of the first section) of a packed artifact."""
    (hl,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8:8 + hl]), 8 + hl

def unpack_artifact(blob: bytes) -> tuple:
    """Inverse of pack_artifact: (ModelConfig, entries on CPU)."""
    if blob[:4] != ARTIFACT_MAGIC:
        raise ValueError("not a PGQ1 artifact")
    header, pos = artifact_header(blob)
    arrays = {}
    if pos + sum(header["sections"]) != len(blob):
        raise ValueError("artifact body does not match its header")
    for k, size in zip(STREAMS, header["sections"]):
        b = blob[pos:pos + size]
        pos += size
        arrays[k] = np.frombuffer(b, np.int8) if k.startswith("int") else \
            np.frombuffer(np.frombuffer(b, np.uint8).reshape(2, -1).T.tobytes(), np.float16)
    off = dict.fromkeys(STREAMS, 0)

    def take(k, n, shape):
        off[k] += n
        return torch.from_numpy(arrays[k][off[k] - n:off[k]].copy()).view(shape)

    entries = {}
    for name, kind, shape in header["tensors"]:
        n = int(np.prod(shape))
        entries[name] = dict(kind=kind, data=take("fp16", n, shape)) if kind == "fp16" else \
            dict(kind=kind, q=take(kind, n, shape), scale=take("scale", shape[0], [shape[0]]))
    return ModelConfig(**header["config"]), entries

def compress(blob: bytes, threads: int = 0, quality: int = 11) -> bytes:
    """Brotli over independent chunks, in parallel (Brotli releases the GIL). An artifact is cut at its
    sections, then every 4 MiB: one Brotli stream over int6 and int8 codes together came out up to 1.7%
    larger than the two compressed apart (measured), and per-section streams keep the size predictable."""
    import brotli
    cuts = set(range(0, len(blob), BROTLI_CHUNK))
    if blob[:4] == ARTIFACT_MAGIC:
        (header, pos), cuts = artifact_header(blob), {0}
        for size in header["sections"]:
            cuts.update(range(pos, pos + size, BROTLI_CHUNK))
            pos += size
    bounds = sorted(cuts | {len(blob)})
    chunks = [blob[a:b] for a, b in zip(bounds, bounds[1:])]
    with ThreadPoolExecutor(threads or max(1, min(len(chunks), os.cpu_count() or 1))) as ex:
        parts = list(ex.map(lambda c: brotli.compress(c, quality=quality, lgwin=24), chunks))
    return struct.pack("<I", len(parts)) + b"".join(struct.pack("<I", len(p)) for p in parts) + b"".join(parts)

def decompress(data: bytes) -> bytes:
    import brotli
    n = struct.unpack("<I", data[:4])[0] if len(data) >= 4 else len(data)
    sizes = struct.unpack(f"<{n}I", data[4:4 + 4 * n]) if 4 + 4 * n <= len(data) else None
    if sizes is None or 4 + 4 * n + sum(sizes) != len(data):
        raise ValueError("not a compressed artifact of train_gpt.py: its chunk table does not match its size")
    ends = np.cumsum((4 + 4 * n,) + sizes).tolist()
    return b"".join(brotli.decompress(data[a:b]) for a, b in zip(ends, ends[1:]))

def export_model(search: RateSearch, cfg: ModelConfig, code_bytes: int, limit: int, device, log) -> tuple:
    """The rate search (timed as quantization), then rank 0 compresses for real (timed on its own). A total
    outside [FIT_BAND[0] x limit, limit] runs the search again with its budget scaled by the miss, and then once
    more at the knob interpolated from the two measured sizes; an overshoot left after that is pruned by
    prune_to_fit. Returns (entries, compressed blob on rank 0, knob, predicted model bytes, search ms,
    compress ms)."""
    budget = goal = limit - code_bytes
    search_ms = compress_ms = 0.0
    measured = []
    for attempt in range(3):
        t0 = time.perf_counter()
        secant = attempt == 2 and min(measured)[0] > 0 and len(set(measured)) == 2 and measured[0][1] != measured[1][1]
        if not secant:
            try:
                entries, knob, predicted = search.run(goal)
            except FitError as e:
                raise FitError(f"ARTIFACT_BYTES_LIMIT={limit} cannot be met with {code_bytes} bytes of code: "
                               f"{e}") from None
        else:  # log size is near linear in log knob: the secant through both measurements
            (c0, a0), (c1, a1) = measured
            knob = math.exp(math.log(c1) + (math.log(c1) - math.log(c0)) * math.log(
                budget * FIT_TARGET / a1) / (math.log(a1) - math.log(a0)))
            predicted, _, codes = search.predict(knob, True)
            entries = search.entries(codes, knob)
        sync(device)
        t1 = time.perf_counter()
        blob = compress(pack_artifact(entries, cfg)) if search.rank == 0 else b""
        size = torch.tensor([float(len(blob))], dtype=torch.float64, device=device)
        if search.world > 1:
            dist.broadcast(size, 0)
        search_ms, compress_ms = search_ms + 1000 * (t1 - t0), compress_ms + 1000 * (time.perf_counter() - t1)
        actual = size.item()
        if attempt == 2 or actual <= budget and (knob == 0.0 or code_bytes + actual >= FIT_BAND[0] * limit):
            return entries, blob, knob, predicted, search_ms, compress_ms
        measured.append((knob, actual))
        goal = goal * predicted / actual
        log(f"quant:verify: knob {knob:.6g} gave {actual:.0f} model bytes, predicted {predicted:.0f}; searching "
            "again")

def prune_to_fit(entries: dict, data: bytes, cfg: ModelConfig, hessians: dict, code_bytes: int, limit: int,
                 log) -> tuple:
    """The last bytes: while code + compressed model (`data`, of `entries`) exceed the limit, zero more of the
    +-1 int6 codes whose loss costs least (scale_row^2 * H_jj) and measure again. Returns (entries packed,
    compressed bytes); FitError if it cannot fit."""
    total0 = total = code_bytes + len(data)
    if total <= limit:
        return entries, data
    names = [n for n, e in entries.items() if e["kind"] == "int6"]
    flat = torch.cat([entries[n]["q"].reshape(-1) for n in names])
    cost = torch.cat([(entries[n]["scale"].float()[:, None].square() * (
        hessians[n].diagonal()[None].to(flat.device) if n in hessians else 1.0)).reshape(-1) for n in names])
    cand = torch.nonzero(flat.abs() == 1).squeeze(1)
    cand = cand[torch.argsort(cost[cand], stable=True)]
    log(f"selective_prune: {total} bytes is {total - limit} over {limit}; {len(cand)} +-1 candidates")
    k = 0
    while total > limit:
        if k == len(cand):
            raise FitError(f"pruning every +-1 code still leaves {total} bytes > ARTIFACT_BYTES_LIMIT={limit}")
        rate = (total0 - total) / k if k and total0 > total else 1 / 8  # bytes saved per pruned code
        k = min(len(cand), k + math.ceil((total - limit) / rate * 1.15) + 64)
        q = flat.clone()
        q[cand[:k]] = 0
        pruned, off = dict(entries), 0
        for n in names:
            pruned[n] = dict(entries[n], q=q[off:off + entries[n]["q"].numel()].view_as(entries[n]["q"]))
            off += entries[n]["q"].numel()
        data = compress(pack_artifact(pruned, cfg))
        total = code_bytes + len(data)
        log(f"selective_prune: zeroed {k} codes -> total {total} bytes")
    return pruned, data

TEMP_FILES = set()  # write_atomic's files in flight, for a peer's failure that ends this process mid-write

def write_atomic(path: Path, data: bytes):
    """Readers never see a partial file, and a failure leaves no temporary file behind."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    TEMP_FILES.add(tmp)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        TEMP_FILES.discard(tmp)

def load_artifact(path) -> tuple:
    return unpack_artifact(decompress(Path(path).read_bytes()))

def save_checkpoint(path: Path, model: GPT, cfg: ModelConfig) -> int:
    """final_model.pt (a plain fp32 state dict) and final_model.json (the config it exports with) beside it."""
    raw = io.BytesIO()
    torch.save(model.state_dict(), raw)
    write_atomic(path, raw.getvalue())
    write_atomic(path.with_suffix(".json"), json.dumps(dict(config=dataclasses.asdict(cfg)), indent=1).encode())
    return len(raw.getvalue())

def load_checkpoint(path: Path, fallback: ModelConfig) -> tuple:
    """EXPORT_ONLY: (config, state dict) of a saved final_model.pt. The config comes from the .json beside it,
    else from the hyperparameters (`fallback`); names and shapes must match that architecture exactly, and every
    weight must be finite."""
    what = f"EXPORT_ONLY={path} is not a checkpoint (the final_model.pt a training run writes)"
    if not path.is_file():
        raise ConfigError(f"EXPORT_ONLY={path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ConfigError(f"{what}: it is not a torch.save file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{what}: torch.load fails ({error_text(e)})") from None
    if not (isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values())):
        raise ConfigError(f"{what}: it holds no state dict of tensors")
    meta = path.with_suffix(".json")
    try:
        cfg = ModelConfig(**json.loads(meta.read_text())["config"]) if meta.is_file() else fallback
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"EXPORT_ONLY: {meta} is not a model config ({e})") from None
    source = meta if meta.is_file() else "the hyperparameters"
    with torch.device("meta"):
        want = {n: tuple(v.shape) for n, v in GPT(cfg).state_dict().items()}
    got = {n: tuple(v.shape) for n, v in sd.items()}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or [n for n in want if got[n] != want[n]]
        raise ConfigError(f"EXPORT_ONLY={path} does not match the architecture from {source}: {bad[0]} "
                          f"{got.get(bad[0], 'missing')} vs {want.get(bad[0], 'unexpected')}")
    bad = next((n for n, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise ConfigError(f"EXPORT_ONLY={path} holds non-finite weights ({bad}): the run that wrote it diverged")
    return cfg, sd

def check_roundtrip(packed: dict, loaded: dict):
    """The artifact's tensors must equal what the quantizer produced, bit for bit (same names, kinds,
    shapes and bytes, so they pack to the same blob)."""
    if pack_artifact(packed, ModelConfig()) != pack_artifact(loaded, ModelConfig()):
        raise RuntimeError("artifact roundtrip: the unpacked tensors differ from the quantizer output")

# ============================================================================ evaluation

def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list:
    """(start, first_scored) per window; window `start` reads tokens[start:start+L] and predicts targets
    start+1..start+L. The first window scores all its positions, each later one (start += stride) only the
    targets after the previous window's end; the last ends exactly at n_targets: every target once."""
    L = min(seq_len, n_targets)
    wins, prev_end, start = [], 0, 0
    while True:
        start = min(start, n_targets - L)
        wins.append((start, prev_end - start))
        prev_end = start + L
        if prev_end >= n_targets:
            return wins
        start += stride

@dataclasses.dataclass
class Tally:
    t0: float  # perf_counter at the start
    sums: torch.Tensor  # (NLL, targets, bytes), on the device
    nll: torch.Tensor | None  # per-target NLL (DUMP_TOKEN_NLL), or None

class Evaluator:
    """Scores windows of the validation stream, on this rank's share, with an NLL function (a strategy: plain,
    SLOT, or the model TTT adapts), and reduces the sums over ranks."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_tokens: int, luts, device, rank=0, world=1,
                 compile_fn=None, kernels=(), kernel_of=None):
        self.tok = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.n = len(tokens) - 1
        self.L, self.device, self.rank, self.world = min(seq_len, self.n), device, rank, world
        # batch cap, whatever VAL_BATCH_TOKENS says: 1 GiB of fp32 logits on GPU, 32 MiB worth on CPU (row-chunked)
        cap = (1 << 28 if device.type == "cuda" else 1 << 23) // (self.L * len(luts[0]))
        self.batch = max(1, min(batch_tokens // (seq_len * world), cap))
        self.rows = 0 if device.type == "cuda" else max(1, (1 << 21) // len(luts[0]))  # CPU head: 8 MiB logits
        self.luts = tuple(t.to(device) for t in luts)
        self.compile_fn = compile_fn
        self.kernels = kernels  # SDPA kinds an evaluation may use, the training's first; empty: SDPA's defaults
        self.kernel_of = kernel_of  # (batch, length, grad) -> the attention kernel that runs there, for the record
        self.ran = {}  # (batch, length, grad) -> kernel, for the current evaluation

    def attention(self):
        """Every SDPA kernel for an evaluation, the training's first (training pins it alone): a shape it refuses
        (cuDNN: sequence length 1, as TTT's last piece of a chunk can be) falls back to the next instead of failing.
        A compiled evaluation traces inside this context, so it compiles the same choice."""
        if not self.kernels:
            return nullcontext()
        return sdpa_kernel([SDPA_BACKENDS[k] for k in self.kernels], set_priority=True)

    def note(self, x: torch.Tensor, grad: bool = False):
        """Records which attention kernel runs on inputs x (batch, length)."""
        key = (*x.shape, grad)
        if self.kernel_of is not None and key not in self.ran:
            self.ran[key] = self.kernel_of(*key)

    def windows(self, idx, length=None):
        """(x, y): `length` (default L) inputs starting at each of idx (b,), and the targets one token on."""
        seq = self.tok[idx[:, None] + torch.arange((length or self.L) + 1, device=self.device)]
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # padded or not, one stride: no recompile

    def batches(self, wins):
        """This rank's contiguous share of `wins` as (starts, first_scored) batches of equal first_scored."""
        mine = wins[self.rank * len(wins) // self.world:(self.rank + 1) * len(wins) // self.world]
        starts = torch.tensor([w[0] for w in mine], dtype=torch.long).to(self.device)  # one copy per call
        i = 0
        while i < len(mine):
            j = min(i + self.batch, len(mine))
            j = next((k for k in range(i + 1, j) if mine[k][1] != mine[i][1]), j)
            yield starts[i:j], mine[i][1]
            i = j

    def plain(self, model):
        """NLL function of `model` as it is: no_grad, compiled once (static shapes: short batches are padded).
        Build it once per model and reuse it: each build compiles again."""
        fn = self.compile_fn(model.forward_nll) if self.compile_fn else model.forward_nll

        def nll(x, y, s0):
            pad = self.batch - len(x) if self.compile_fn else 0
            xp, yp = (torch.cat([x, x[-1:].expand(pad, -1)]), torch.cat([y, y[-1:].expand(pad, -1)])) if pad else (x, y)
            with torch.no_grad(), autocast_ctx(self.device):
                return fn(xp, yp, s0, self.rows)[:len(x)].float()
        return nll

    def slot(self, model, steps: int, lr: float):
        """NLL function of context-only SLOT (slot_nll) on `model`."""
        return lambda x, y, s0: slot_nll(model, x, y, s0, steps, lr, self.device)

    def start(self, dump: bool) -> Tally:
        sync(self.device)
        self.ran = {}
        return Tally(time.perf_counter(), torch.zeros(3, dtype=torch.float64, device=self.device),
                     torch.zeros(self.n, device=self.device) if dump else None)

    def score(self, nll_fn, wins, tally: Tally):
        """Adds the NLL of every scored position of this rank's share of `wins` to the tally (and its dump)."""
        for starts, s0 in self.batches(wins):
            x, y = self.windows(starts)
            self.note(x)
            self.add(tally, nll_fn(x, y, s0), starts[:, None] + torch.arange(s0 + 1, self.L + 1, device=self.device))

    def add(self, tally: Tally, nll, tgt, keep=None):
        """Adds the NLL of targets `tgt` (stream indices 1..n, nll's shape) to the tally; with `keep` (bool, same
        shape) only those it marks (the others' indices need only be in range). Device-side: no host sync."""
        nbytes = count_bytes(self.tok[tgt - 1], self.tok[tgt], self.luts)
        if keep is not None:
            nll, nbytes = torch.where(keep, nll, 0.0), torch.where(keep, nbytes, 0)
        tally.sums[0] += nll.double().sum()
        tally.sums[1] += nll.numel() if keep is None else keep.sum()
        tally.sums[2] += nbytes.sum()
        if tally.nll is not None:  # each target once, so accumulating into zeros writes it
            tally.nll.index_put_((tgt.reshape(-1) - 1,), nll.reshape(-1).float(), accumulate=True)

    def finish(self, tally: Tally) -> dict:
        """(loss, bpb, ms, nll, attention): the sums over all ranks (every target must have been scored exactly
        once), and which attention kernels ran at which shapes."""
        if self.world > 1:
            dist.all_reduce(tally.sums)
            if tally.nll is not None:
                dist.all_reduce(tally.nll)
        nll, n, nbytes = tally.sums.tolist()  # waits for the device
        if int(n) != self.n:
            raise RuntimeError(f"scored {int(n)} targets, expected exactly {self.n}")
        ran = ", ".join(f"{k} at {b}x{t}" + (" (training)" if g else "") for (b, t, g), k in self.ran.items())
        return dict(loss=nll / n, bpb=nll / (math.log(2) * nbytes), ms=1000 * (time.perf_counter() - tally.t0),
                    nll=None if tally.nll is None else tally.nll.cpu().numpy(), attention=ran or "not recorded")

    def evaluate(self, nll_fn, stride: int, dump=False) -> dict:
        """Sliding-window eval (stride = seq_len gives the plain non-overlapping eval): see finish."""
        with self.attention():
            tally = self.start(dump)
            self.score(nll_fn, sliding_windows(self.n, self.L, stride), tally)
            return self.finish(tally)

def evaluate_ttt(ev: Evaluator, model, hp: Hyperparameters, dump=False, log=print) -> dict:
    """Legal score-first TTT: chunk c's windows are scored under no_grad with the weights adapted on
    chunks < c only; then a copy of the model trains on chunk c's (already scored) tokens."""
    with ev.attention():
        tally = ev.start(dump)
        m = copy.deepcopy(model).requires_grad_(False)
        params, opt = ttt_sgd(m, hp)
        for p in params:
            p.requires_grad_(True)
        nll_fn = ev.plain(m)
        C = hp.ttt_chunk_tokens
        n_chunks = math.ceil(ev.n / C)
        by_chunk = [[] for _ in range(n_chunks)]
        for w in sliding_windows(ev.n, ev.L, hp.eval_stride):
            by_chunk[(w[0] + w[1]) // C].append(w)  # by the first target it scores
        for c in range(n_chunks):
            ev.score(nll_fn, by_chunk[c], tally)
            if c == n_chunks - 1 or hp.ttt_epochs == 0:
                continue
            lr = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(1, n_chunks - 1)))
            for g in opt.param_groups:
                g["lr"] = lr
            for _ in range(hp.ttt_epochs):
                sgd_pass(ev, m, params, opt, c * C, min((c + 1) * C, ev.n), hp)  # targets all scored by now
            if (c + 1) % max(1, n_chunks // 10) == 0:
                log(f"ttt_chunk [{c + 1}/{n_chunks}] lr: {lr:.6f}")
        return ev.finish(tally)

def ttt_sgd(m: GPT, hp: Hyperparameters) -> tuple:
    """(params, optimizer) of the whole-model TTT SGD (both modes): every parameter outside the first
    TTT_FREEZE_BLOCKS blocks."""
    frozen = {id(p) for blk in m.blocks[:hp.ttt_freeze_blocks] for p in blk.parameters()}
    params = [p for p in m.parameters() if id(p) not in frozen]
    return params, torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)

def sgd_pass(ev: Evaluator, m, params, opt, lo: int, hi: int, hp: Hyperparameters):
    """One pass of whole-model SGD over targets lo+1..hi: EVAL_SEQ_LEN sequences, TTT_BATCH_SEQS per step."""
    seqs = [(s, min(s + ev.L, hi)) for s in range(lo, hi, ev.L)]
    for b0 in range(0, len(seqs), hp.ttt_batch_seqs):
        ttt_step(ev, m, params, opt, seqs[b0:b0 + hp.ttt_batch_seqs], hp.ttt_grad_clip)

def ttt_step(ev: Evaluator, m, params, opt, group, grad_clip: float):
    """One SGD step on the (start, end) target ranges of `group`, split over ranks; the loss is the mean over
    the group's targets whatever the split."""
    n_tgt, mine = sum(e - s for s, e in group), group[ev.rank::ev.world]
    for length in sorted({e - s for s, e in mine}):
        x, y = ev.windows(torch.tensor([s for s, e in mine if e - s == length], device=ev.device), length)
        ev.note(x, grad=True)
        with autocast_ctx(ev.device):
            loss = m(x, y) * (len(x) * length / n_tgt)
        loss.backward()
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        if ev.world > 1:
            dist.all_reduce(p.grad)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)

def documents(tokens: np.ndarray) -> np.ndarray:
    """(start, targets) per document, the stream cut before every BOS: document d reads tokens[s:s+k] and predicts
    targets s+1..s+k (its own tokens, then the next BOS), so every target belongs to exactly one document."""
    n = len(tokens) - 1
    starts = np.r_[0, np.flatnonzero(tokens[1:n] == BOS_ID) + 1]
    return np.stack([starts, np.diff(np.r_[starts, n])], axis=1)

def lora_window(ci: int, chunk: int, L: int) -> tuple:
    """(first input, padded length) of the window that scores chunk ci of a document: the chunk and at most
    L - chunk tokens before it, padded at the end (never attended by the chunk) to a power of two <= L, so that
    few shapes (compiles) cover every window."""
    end = (ci + 1) * chunk
    w0 = max(0, end - L)
    return w0, min(L, 1 << (end - w0 - 1).bit_length())

def lora_phases(hp: Hyperparameters, n_docs: int) -> list:
    """Document ranges [d0, d1): TTT_PHASES equal phases over the first TTT_PREFIX_DOCS documents, then the rest.
    Whole-model SGD follows each non-empty phase that leaves documents to score."""
    prefix = min(hp.ttt_prefix_docs, n_docs) if hp.ttt_phases else 0
    phases = hp.ttt_phases if prefix else 0
    cuts = [prefix * p // phases for p in range(phases)] + [prefix, n_docs]
    return list(zip(cuts, cuts[1:]))

def lora_batches(docs: np.ndarray, group, rank: int, world: int, rows: int) -> list:
    """This rank's batches of the documents `group`: sorted by length (longest first, ties in stream order),
    dealt to the ranks in turn, `rows` side by side."""
    mine = sorted(group, key=lambda d: -docs[d, 1])[rank::world]
    return [mine[i:i + rows] for i in range(0, len(mine), rows)]

LORA_TARGETS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj", "up": "mlp.fc",
                "down": "mlp.proj"}  # TTT_LORA_TARGETS names -> each block's Linear; "head": the tied head

class DocLoRA:
    """One rank-r adapter per batch row (a document) on each target projection: A (rows, in, r), B (rows, r, out).
    Every row restarts from the same state (A a fixed random matrix, B zero: no change), so a document's scores
    depend on that document only; AdamW works per element, so rows never share a step."""

    def __init__(self, model: GPT, hp: Hyperparameters, rows: int, device):
        targets = hp.ttt_lora_targets.split(",")
        self.sites = [(blk.get_submodule(LORA_TARGETS[t]), "lora") for blk in model.blocks
                      for t in targets if t != "head"] + ([(model, "head_lora")] if "head" in targets else [])
        shapes = [(m.in_features, m.out_features) if m is not model else (model.cfg.model_dim, model.cfg.vocab_size)
                  for m, _ in self.sites]
        g, r = torch.Generator().manual_seed(0), hp.ttt_lora_rank
        self.a0 = [(torch.randn(i, r, generator=g) / math.sqrt(i)).to(device) for i, _ in shapes]
        self.pairs = [(torch.zeros(rows, i, r, device=device, requires_grad=True),
                       torch.zeros(rows, r, o, device=device, requires_grad=True)) for i, o in shapes]
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW([t for p in self.pairs for t in p], lr=hp.ttt_lora_lr, betas=LORA_BETAS,
                                     weight_decay=hp.ttt_lora_wd, **fused)

    def attach(self, on: bool):
        for (m, name), pair in zip(self.sites, self.pairs):
            setattr(m, name, pair if on else None)

    @torch.no_grad()
    def reset(self):
        for (a, b), a0 in zip(self.pairs, self.a0):
            a.copy_(a0.expand_as(a))
            b.zero_()
        self.opt.state.clear()

LORA_BETAS = (0.0, 0.999)  # upstream's: no momentum, so a document's first steps are not damped

def chunk_nll(model: GPT, x, y, pos):
    """NLL (B, len(pos)) of targets y[:, pos]: the hidden states of the whole window, the head only at pos (a
    tensor, so one graph serves every chunk offset)."""
    logits = model.logits(model.hidden(x).index_select(1, pos))
    return F.cross_entropy(logits.flatten(0, 1), y.index_select(1, pos).flatten(), reduction="none").view(len(x), -1)

def evaluate_lora_ttt(ev: Evaluator, model, hp: Hyperparameters, dump=False, log=print) -> dict:
    """Score-first, document-wise LoRA TTT (TTT_MODE=lora). Each document is scored on its own tokens only, in
    chunks of TTT_LORA_CHUNK_TOKENS targets under at most EVAL_SEQ_LEN tokens of its prefix; once a chunk is
    scored (the loss of the same forward, before any step that saw it), one AdamW step trains that document's
    adapters on it. The first TTT_PREFIX_DOCS documents are scored in TTT_PHASES phases; after each, the base
    weights take TTT_EPOCHS passes of whole-model SGD over the stream up to the phase's last (scored) target. The
    rest are scored by the final base. Ranks split the documents; the SGD averages gradients over ranks."""
    with ev.attention():
        tally, docs = ev.start(dump), documents(ev.tok.cpu().numpy())
        m, dev = copy.deepcopy(model).requires_grad_(False), ev.device
        C, rows = hp.ttt_lora_chunk_tokens, hp.ttt_lora_batch_docs
        lora = DocLoRA(m, hp, rows, dev) if hp.ttt_lora_rank else None
        if lora:
            lora.attach(True)
        fn = (ev.compile_fn or (lambda f: f))(lambda x, y, pos: chunk_nll(m, x, y, pos))
        params, opt = ttt_sgd(m, hp)
        groups = lora_phases(hp, len(docs))
        phases = len(groups) - 1
        ar = torch.arange(max(ev.L, C) + 1, device=dev)
        graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
        g0, shapes = graphs(), set()
        est = lora_ttt_estimate(m, hp, docs, ev.L)
        log(f"ttt:eval_estimate_8xh100_s: {est['total']:.0f} (lora: {est['lora']:.3g} global_sgd: {est['sgd']:.3g} "
            f"compile: ~{est['compile']:.0f} roundtrip: {est['roundtrip']:.3g}; FLOPs at {H100_EVAL_FLOPS / 1e12:.0f} "
            f"TFLOP/s per GPU, the rate of the reference's sliding eval) "
            + ("fits" if est["total"] <= 600 else "does not fit") + f" 600s with the sliding eval skipped "
            f"(SLIDING_WINDOW_ENABLED=0; it would add {est['sliding']:.3g}s)")
        for g, (d0, d1) in enumerate(groups):
            sync(dev)
            t0 = time.perf_counter()
            for batch in lora_batches(docs, range(d0, d1), ev.rank, ev.world, rows):
                st, ln = np.zeros((2, rows), dtype=np.int64)
                st[:len(batch)], ln[:len(batch)] = docs[batch].T
                starts, lens = torch.from_numpy(st).to(dev), torch.from_numpy(ln).to(dev)
                if lora:
                    lora.reset()
                n_chunks = -(-int(ln.max()) // C)
                for ci in range(n_chunks):
                    w0, T = lora_window(ci, C, ev.L)
                    shapes.add(T)
                    q = ci * C + ar[:C]  # the chunk's targets, as offsets into each document's
                    seq = ev.tok[(starts[:, None] + w0 + ar[:T + 1]).clamp_max(ev.n)]
                    keep = q[None] < lens[:, None]
                    ev.note(seq[:, :-1], grad=lora is not None)
                    with torch.set_grad_enabled(lora is not None), autocast_ctx(dev):  # one graph per shape
                        nll = fn(seq[:, :-1], seq[:, 1:], q - w0).float()
                    ev.add(tally, nll.detach(), (starts[:, None] + 1 + q).clamp_max(ev.n), keep)
                    if lora and ci < n_chunks - 1:
                        (torch.where(keep, nll, 0.0).sum(1) / keep.sum(1).clamp_min(1)).sum().backward()
                        lora.opt.step()
                        lora.opt.zero_grad(set_to_none=True)
            sync(dev)
            t1 = time.perf_counter()
            scored = f"docs: {d1 - d0} targets: {int(docs[d0:d1, 1].sum())} scored_in: {1000 * (t1 - t0):.0f}ms"
            if g == phases:
                log(f"ttt_phase: rest {scored}")
                break
            hi = int(docs[d1 - 1].sum()) if d1 > d0 else 0  # the phase's last target: SGD sees only scored documents
            if len(docs) > d1 > d0:
                if lora:
                    lora.attach(False)
                for p in params:
                    p.requires_grad_(True)
                for _ in range(hp.ttt_epochs):
                    sgd_pass(ev, m, params, opt, 0, hi, hp)
                m.requires_grad_(False)
                if lora:
                    lora.attach(True)
            sync(dev)
            log(f"ttt_phase: {g + 1}/{phases} {scored} sgd_on_targets: {hi} sgd: {1000 * (time.perf_counter() - t1):.0f}ms")
        log(f"ttt_lora: window shapes: {len(shapes)} ({rows} x {sorted(shapes)}) graphs_compiled: {graphs() - g0}")
        return ev.finish(tally)

H100_EVAL_FLOPS = 2.54e14  # per GPU: the reference's sliding eval, 711,041 windows x 2048 tokens of forward FLOPs
COMPILE_S = 10.0  # per graph (forward + backward), the reference's recompile at its recurrence switch

def lora_ttt_estimate(m: GPT, hp: Hyperparameters, docs: np.ndarray, L: int, world: int = 8) -> dict:
    """Seconds on `world` H100s: the FLOPs of every chunk window evaluate_lora_ttt runs (batch rows and window
    padding included; the backward costs 1x the forward's matmuls (activation gradients only), 2x its attention
    and 2x its LoRA), the phases' SGD (6 x weights per token) and the plain evals, at H100_EVAL_FLOPS; compiles
    at COMPILE_S per window shape."""
    order = m.layer_order()
    d, V, r, C, rows = m.cfg.model_dim, m.cfg.vocab_size, hp.ttt_lora_rank, hp.ttt_lora_chunk_tokens, hp.ttt_lora_batch_docs
    lins = [[x for x in m.blocks[l].modules() if isinstance(x, nn.Linear)] for l in order]
    mats = sum(x.weight.numel() for ls in lins for x in ls)
    targets = hp.ttt_lora_targets.split(",")
    tw = {id(m.blocks[l].get_submodule(LORA_TARGETS[t])) for l in order for t in targets if t != "head"}
    lw = r * sum(x.in_features + x.out_features for ls in lins for x in ls if id(x) in tw)
    hw, hl = d * V, r * (d + V) * ("head" in targets)
    b = 1 if r else 0  # backward: only with adapters
    fwd = lambda T: 2 * mats + 2 * len(order) * T * d
    chunk = lambda T: rows * T * ((2 + 2 * b) * mats + (2 + 4 * b) * len(order) * T * d + (2 + 4 * b) * lw) \
        + rows * C * ((2 + 2 * b) * hw + (2 + 4 * b) * hl)
    lora, shapes, sgd_tokens = 0.0, set(), 0
    for d0, d1 in lora_phases(hp, len(docs)):
        per_rank = []
        for rank in range(world):
            f = 0.0
            for batch in lora_batches(docs, range(d0, d1), rank, world, rows):
                for ci in range(-(-int(docs[batch, 1].max()) // C)):
                    T = lora_window(ci, C, L)[1]
                    shapes.add(T)
                    f += chunk(T)
            per_rank.append(f)
        lora += max(per_rank)
        if len(docs) > d1 > d0:
            sgd_tokens += hp.ttt_epochs * int(docs[d1 - 1].sum())
    n = int(docs[:, 1].sum())
    rate = H100_EVAL_FLOPS * world
    out = dict(lora=lora / H100_EVAL_FLOPS, sgd=sgd_tokens * flops_per_token(m, m.recur_active, L) / rate,
               compile=COMPILE_S * len(shapes), roundtrip=n * (fwd(L) + 2 * hw) / rate,
               sliding=n / hp.eval_stride * L * (fwd(L) + 2 * hw) / rate)
    out["total"] = out["lora"] + out["sgd"] + out["compile"] + out["roundtrip"]
    return out

def slot_nll(model, x, y, s0: int, steps: int, lr: float, device):
    """Context-only SLOT: one additive delta per window (b, 1, d) on the final hidden state, fitted with
    AdamW to that window's already-scored context positions (< s0) only, then used on the new ones."""
    with torch.no_grad(), autocast_ctx(device):
        h = model.hidden(x).float()
    delta = torch.zeros(h.size(0), 1, h.size(2), device=device, requires_grad=True)
    if s0 > 0 and steps > 0:
        opt = torch.optim.AdamW([delta], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            with autocast_ctx(device):
                logits = model.logits(h[:, :s0] + delta)
            nll = F.cross_entropy(logits.transpose(1, 2), y[:, :s0], reduction="none")
            opt.zero_grad(set_to_none=True)
            nll.mean(dim=1).sum().backward()  # sum of per-window means: windows never share a gradient
            opt.step()
    with torch.no_grad(), autocast_ctx(device):
        logits = model.logits(h[:, s0:] + delta)
    return F.cross_entropy(logits.transpose(1, 2), y[:, s0:], reduction="none")

# ============================================================================ main

@dataclasses.dataclass
class Inputs:
    """What preflight found and checked: everything a run reads, before any GPU work."""
    train: list  # training shard paths
    val: list  # validation shard paths
    tokenizer: str
    sp: object  # the SentencePiece processor
    val_tokens: np.ndarray
    artifact: tuple | None = None  # EVAL_ONLY: (ModelConfig, entries)
    checkpoint: tuple | None = None  # EXPORT_ONLY: (ModelConfig, state dict)

def preflight(hp: Hyperparameters) -> Inputs:
    """Check everything a run needs before any GPU work; nothing is written."""
    train, val, tok = data_paths(hp)
    vocab = hp.model.vocab_size
    get = f"run `python data/prepare.py download --variant sp{vocab}` or set DATA_DIR"
    if not Path(tok).is_file():
        raise ConfigError(f"tokenizer not found at {tok}: {get} (or TOKENIZER_PATH)")
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=tok)
    except Exception as e:
        raise ConfigError(f"{tok} is not a SentencePiece model ({e})") from None
    if sp.id_to_piece(sp.piece_to_id("\u2581")) != "\u2581":
        raise ConfigError(f"tokenizer {tok} has no piece that is U+2581 alone (the space marker): every space would "
                          "count as its 3 UTF-8 bytes and val_bpb would come out too low (upstream issue #897)")
    if sp.get_piece_size() != vocab:
        raise ConfigError(f"tokenizer {tok} has {sp.get_piece_size()} pieces but VOCAB_SIZE={vocab}")
    if not train and not hp.eval_only:  # EXPORT_ONLY calibrates on training data
        raise ConfigError(f"no training shards match {hp.train_files or 'DATA_DIR/datasets/*/fineweb_train_*.bin'}"
                          f" (DATA_DIR={hp.data_dir}): {get} (or TRAIN_FILES)")
    if not val:
        raise ConfigError(f"no validation shards found under {hp.data_dir}: {get} (or VAL_FILES)")
    artifact = None
    if hp.eval_only:
        try:
            artifact = load_artifact(hp.eval_only)
        except Exception as e:
            raise ConfigError(f"EVAL_ONLY={hp.eval_only}: cannot load artifact ({error_text(e)})") from None
        if artifact[0].vocab_size != vocab:
            raise ConfigError(f"EVAL_ONLY artifact has vocab {artifact[0].vocab_size}, VOCAB_SIZE={vocab}")
        hp.eval_seq_len = hp.eval_seq_len or artifact[0].max_seq_len  # unless set: the run's sequence length
        hp.validate()
    checkpoint = load_checkpoint(Path(hp.export_only), hp.model_config()) if hp.export_only else None
    try:
        for p in train + val:
            read_shard_header(p)
        val_tokens = load_val_tokens(val, hp.eval_seq_len)
    except ShardError as e:
        raise ConfigError(f"{e}: re-download or rebuild it with data/prepare.py") from None
    if val_tokens.max() >= vocab:
        raise ConfigError(f"validation holds token id {val_tokens.max()} >= VOCAB_SIZE={vocab}: wrong data?")
    if not hp.eval_only and Path(__file__).stat().st_size >= hp.artifact_bytes_limit:
        raise ConfigError(f"code alone is {Path(__file__).stat().st_size} bytes, over ARTIFACT_BYTES_LIMIT="
                          f"{hp.artifact_bytes_limit}")
    out = Path(hp.out_dir).resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out} is not writable: set OUT_DIR to a writable folder")
    return Inputs(train, val, tok, sp, val_tokens, artifact, checkpoint)

def ensure_smoke_data(hp: Hyperparameters):
    """SMOKE=1: build shards from the embedded sample once (data/prepare.py sample)."""
    train, val, tok = data_paths(hp)
    if train and val and Path(tok).is_file():
        return
    if hp.world_size > 1:
        raise ConfigError("SMOKE=1 runs as one process: use plain `python train_gpt.py`")
    script = Path(__file__).resolve().parent / "data" / "prepare.py"
    if not script.is_file():
        raise ConfigError(f"SMOKE=1 needs {script} to build its data")
    print(f"smoke: building shards from the embedded sample into {hp.data_dir}", flush=True)
    if subprocess.run([sys.executable, str(script), "sample", "--out", hp.data_dir]).returncode:
        raise ConfigError("smoke: data/prepare.py sample failed (see above)")

def run_log_path(hp: Hyperparameters) -> Path:
    return Path(hp.out_dir) / "logs" / f"{hp.run_id}.txt"

def make_logger(path, enabled: bool):
    """Rank 0 only: stdout and logs/<RUN_ID>.txt."""
    f = open(path, "a", encoding="utf-8") if enabled else None

    def log(msg: str):
        if f:
            print(msg, flush=True)
            print(msg, file=f, flush=True)
    return log

# Rank 0 alone saves the checkpoint, compresses the artifact (up to ~8 Brotli passes over ~34 MB of codes when the
# size check and the pruning retry), writes it and reads it back, while the other ranks wait in a collective. One
# pass on one slow core: ~95 s (0.36 MiB/s measured), so torch's default 10 minutes could run out; 30 do not.
PG_TIMEOUT = datetime.timedelta(minutes=30)

def init_runtime(hp: Hyperparameters) -> torch.device:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", hp.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if hp.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=PG_TIMEOUT)
        PeerWatchdog.start(dist.distributed_c10d._get_default_store(), hp)
    torch._dynamo.config.cache_size_limit = 32  # eval graphs per model x recurrence x offset; fullgraph: hard limit
    torch._dynamo.config.optimize_ddp = False
    return device

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # auto's order
ATTN_KINDS = ("fa3", *SDPA_BACKENDS)  # cuDNN beat flash on H100 at our shape

def sdpa_backend(kind: str):
    """Let SDPA use only `kind`'s kernel (training's pin). Global flags: torch.compile reads them when it traces
    SDPA."""
    flag = {"efficient": "mem_efficient"}.get(kind, kind)
    for name in ("cudnn", "flash", "mem_efficient", "math"):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == flag)

def attention_kernel(cfg: ModelConfig, mode: str, batch: int, length: int, grad: bool, device) -> str:
    """The kernel causal_attention(mode) runs on (batch, length) inputs under the current SDPA flags: SDPA's own
    choice, the one torch.compile makes when it traces."""
    if mode == "fa3":
        return "fa3"
    h, hd = cfg.num_heads, cfg.model_dim // cfg.num_heads
    kv = cfg.num_kv_heads if mode == "sdpa" else h
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k = (torch.empty(batch, length, n, hd, device=device, dtype=dtype, requires_grad=grad).transpose(1, 2)
            for n in (h, kv))
    choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=kv != h)
    return next((kind for kind, b in SDPA_BACKENDS.items() if int(b) == choice), "none")

def attention_vs_math(mode: str, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, device) -> dict:
    """Relative error of causal_attention(mode), in the stream's dtype, against fp32 math with K/V expanded:
    the output and the gradients of q, k and v (the SDPA kernel is whatever the global flags allow)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    qkv = [torch.randn(batch, seq_len, h, head_dim, device=device, generator=g) for h in (heads, kv_heads, kv_heads)]
    outs = []
    for m, dt, ctx in ((mode, dtype, nullcontext()), ("sdpa-expand", torch.float32, sdpa_kernel(SDPBackend.MATH))):
        leaves = [t.to(dt).requires_grad_() for t in qkv]
        with ctx:
            out = causal_attention(*leaves, m)
        out.float().square().sum().backward()
        outs.append([out.float()] + [t.grad.float() for t in leaves])
    return {name: relative_error(a, b) for name, a, b in zip(("output", "dq", "dk", "dv"), *outs)}

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

def probe_attention(cfg: ModelConfig, mode: str, batch: int, seq_len: int, device, compile_fn=None) -> tuple:
    """Raise unless attention `mode` runs where training runs it: first against fp32 math at a small shape
    (outputs and gradients, eagerly), then one attention layer (QK-norm, RoPE, GQA, XSA) forward and backward at
    the training micro-batch shape, in the stream's dtype, through the training's compile and autocast. Returns
    that layer's output and input gradient (seeded: every kernel sees the same layer and input), for cross_check."""
    errors = attention_vs_math(mode, 2, 256, cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads, device)
    for name, err in errors.items():
        if not err < 0.05:  # bf16 rounding gives ~0.01; a broken kernel is off by O(1)
            raise RuntimeError(f"{name} differs from the math backend by {err:.3g} (relative)")
    torch.manual_seed(0)
    layer = Attention(cfg, xsa=True).to(device)
    layer.backend = mode
    fn = compile_fn(layer) if compile_fn else layer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, seq_len, cfg.model_dim, device=device, dtype=dtype, requires_grad=True)
    with autocast_ctx(device):
        y = fn(x)
    y.float().square().mean().backward()
    if not (torch.isfinite(y).all() and torch.isfinite(x.grad).all()):
        raise RuntimeError(f"non-finite output or gradient at {batch}x{seq_len}")
    return y.detach(), x.grad

def attention_label(kind: str, mode: str) -> str:
    return kind if mode == "fa3" else f"{kind} ({'native gqa' if mode == 'sdpa' else 'expanded kv'})"

def cross_check(kind: str, result: tuple, references, probe) -> str:
    """At the training shape math is too big to compare with, so a fused kernel's result there is compared with
    those of the other kinds of kernel in `references` (the first mode of each that runs), in order, until one
    agrees: two independent kernels that agree are right, and a wrong reference cannot reject a right kernel alone.
    Raises when every other kind that runs disagrees; returns what it found."""
    if kind == "math":
        return ""
    seen, disagree = {kind}, []
    for ref_kind, ref_mode in references:
        if ref_kind in seen:
            continue
        try:
            ref = probe(ref_kind, ref_mode)
        except Exception:  # that kernel does not run here: try the next
            continue
        seen.add(ref_kind)
        out, grad = (relative_error(a, b) for a, b in zip(result, ref))
        found = f"{attention_label(ref_kind, ref_mode)} at the training shape: output {out:.2g}, input gradient " \
                f"{grad:.2g} (relative)"
        if out < 0.05 and grad < 0.05:
            return f"agrees with {found}"
        disagree.append(found)
    if disagree:
        raise RuntimeError("disagrees with " + "; ".join(disagree))
    return "no kernel of another kind ran at the training shape to cross-check against"

def choose_attention(candidates, probe, agree=lambda ok: ok, references=(), rejected=()) -> tuple:
    """The first (kind, mode) that `probe` runs without raising, and that agrees with another kind of kernel at the
    training shape (cross_check over `references`), on every rank (`agree` ANDs a flag over ranks): (kind, mode,
    label, [why each candidate before it failed], the cross-check's finding). `rejected` starts that list."""
    failures = list(rejected)
    for kind, mode in candidates:
        label = attention_label(kind, mode)
        try:
            checked = cross_check(kind, probe(kind, mode), references, probe)
            ok, why = True, "failed on another rank"
        except Exception as e:  # any failure means: try the next kernel
            ok, why = False, error_text(e)
        if agree(ok):
            return kind, mode, label, failures, checked
        failures.append(f"{label}: {why}")
    raise ConfigError("no attention kernel ran on this GPU: " + "; ".join(failures))

def select_attention(hp: Hyperparameters, device, cfg: ModelConfig, compile_fn=None) -> tuple:
    """(kind, mode for causal_attention, label for the log, rejected candidates with reasons, cross-check finding):
    FA3 when importable, else the first SDPA kernel that runs causal GQA (native, else with K/V expanded), proven by
    probe_attention at the training shape through the training's compile and cross-checked there against another
    kind of kernel; all ranks agree on one. SDPA is left pinned to it (sdpa_backend) for training."""
    if device.type != "cuda":
        return "sdpa", "sdpa", "sdpa (cpu)", [], ""
    kinds = ATTN_KINDS if hp.attn_backend == "auto" else (hp.attn_backend,)
    pairs = lambda ks: [(k, m) for k in ks for m in (("fa3",) if k == "fa3" else ("sdpa", "sdpa-expand"))]
    candidates = [(k, m) for k, m in pairs(kinds) if k != "fa3" or _flash_attn_func is not None]
    rejected = [f"fa3: not importable ({FA3_MISSING})"] if "fa3" in kinds and _flash_attn_func is None else []
    shape = (8, hp.eval_seq_len) if hp.eval_only else (hp.train_seqs // 8, hp.train_seq_len)

    def probe(kind, mode):
        if mode != "fa3":
            sdpa_backend(kind)
        torch._dynamo.reset()  # SDPA's kernel is fixed when traced, and the flags are not guarded: trace afresh
        try:
            return probe_attention(cfg, mode, *shape, device, compile_fn)
        finally:
            torch.cuda.empty_cache()

    def agree(ok: bool) -> bool:
        if hp.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    chosen = choose_attention(candidates, probe, agree, pairs(("cudnn", "flash", "efficient")), rejected)
    if chosen[1] != "fa3":
        sdpa_backend(chosen[0])  # the cross-check's probes moved the flags
    torch._dynamo.reset()
    return chosen

def git_commit() -> str:
    """The checkout's commit (+'-dirty' with uncommitted changes), or 'unavailable'."""
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).resolve().parent, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "-uno") else "") if head else "unavailable"
    except (OSError, subprocess.SubprocessError):
        return "unavailable"

def environment(hp: Hyperparameters, device, attn_label: str, inputs: Inputs) -> dict:
    """What the run ran on: the env: lines and the summary's env."""
    cuda = device.type == "cuda"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    gpus = ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpu": gpus or f"none (cpu, {os.cpu_count()} cores)",
        "gpu_name": names[0] if names else None,
        "gpu_count": len(names),
        "world_size": hp.world_size,
        "grad_accum": hp.grad_accum,
        "attention_backend": attn_label,
        "peak_bf16_tflops": peak_flops(device) / 1e12 if cuda else None,
        "compile": hp.use_compile,
        "git_commit": git_commit(),
        "tokenizer": inputs.tokenizer,
        "tokenizer_sha256": hashlib.sha256(Path(inputs.tokenizer).read_bytes()).hexdigest(),
        "data_fingerprint": shard_fingerprint(inputs.train + inputs.val),
        "train_shards": len(inputs.train),
        "val_shards": len(inputs.val),
    }

def environment_lines(env: dict) -> list:
    """The env: lines in upstream's format: grad_accum beside world_size, shard counts beside the fingerprint."""
    lines = []
    for k, v in env.items():
        if k == "world_size":
            v = f"{v} grad_accum: {env['grad_accum']}"
        elif k == "peak_bf16_tflops":
            if not env["gpu_name"]:
                continue
            v = f"{v:g} per GPU, dense (mfu's denominator)" if v else "unknown for this device: mfu n/a"
        elif k == "data_fingerprint":
            v = f"{v} (train_shards: {env['train_shards']} val_shards: {env['val_shards']})"
        elif k in ("gpu_name", "gpu_count", "grad_accum", "train_shards", "val_shards"):
            continue
        lines.append(f"env: {k}: {v}")
    return lines

def build_model(cfg: ModelConfig, device, attn_mode: str) -> GPT:
    model = GPT(cfg).to(device)
    if device.type == "cuda":  # bf16 residual stream under autocast, as the reference; CPU stays fp32
        model.act_dtype = torch.bfloat16
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = attn_mode
    return model

@dataclasses.dataclass
class Session:
    """A started run: settings, inputs, device, the model config, the attention kernel, the log, the evaluator."""
    hp: Hyperparameters
    inputs: Inputs
    device: torch.device
    cfg: ModelConfig  # the artifact's (EVAL_ONLY), the checkpoint's (EXPORT_ONLY) or the settings'
    attn_mode: str
    log: object  # rank 0: stdout and the log file; other ranks: nothing
    log_path: Path
    env: dict
    code_sha256: str
    code_bytes: int
    evaluator: Evaluator

    @property
    def artifact_path(self) -> Path:
        return Path(self.hp.out_dir) / "final_model.int6.ptz"

    def stream(self, seed: int, seqs: int) -> TrainStream:
        h = self.hp
        return TrainStream(self.inputs.train, h.train_seq_len, seqs, h.rank, h.world_size, seed)

def start_run(hp: Hyperparameters, inputs: Inputs) -> Session:
    """Device and process group, the model config, the attention kernel, then the log's header: run id,
    environment, settings, validation size."""
    device = init_runtime(hp)
    cfg = inputs.artifact[0] if hp.eval_only else inputs.checkpoint[0] if hp.export_only else hp.model_config()
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, hp.eval_seq_len, 0 if hp.eval_only else
                                                   hp.train_seq_len))
    compile_fn = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if hp.use_compile else None
    attn_kind, attn_mode, attn_label, attn_rejected, attn_checked = select_attention(hp, device, cfg, compile_fn)
    hp.run_id = hp.run_id or str(uuid.uuid4())
    if hp.rank == 0:
        (Path(hp.out_dir) / "logs").mkdir(parents=True, exist_ok=True)
    log_path = run_log_path(hp)
    log = make_logger(log_path, hp.rank == 0)
    log(f"run_id: {hp.run_id} started: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    code = Path(__file__).read_bytes()  # the file that runs: the wrapper, when wrapped
    code_sha256, env = hashlib.sha256(code).hexdigest(), environment(hp, device, attn_label, inputs)
    log(f"code_sha256: {code_sha256}")
    for line in environment_lines(env) + [f"attention_probe: rejected {r}" for r in attn_rejected]:
        log(line)
    if attn_checked:
        log(f"attention_probe: {attn_label} {attn_checked}")
    if hp.world_size > 1:
        log(f"process_group: {dist.get_backend()} timeout: {PG_TIMEOUT.total_seconds():.0f}s")
    for line in hp.lines():
        log(line)
    luts = build_byte_luts(inputs.sp, hp.model.vocab_size)
    fallbacks = [attn_kind, *(k for k in SDPA_BACKENDS if k != attn_kind)] if attn_kind in SDPA_BACKENDS else []
    evaluator = Evaluator(inputs.val_tokens, hp.eval_seq_len, hp.val_batch_tokens, luts, device, hp.rank,
                          hp.world_size, compile_fn, fallbacks,
                          lambda b, t, grad: attention_kernel(cfg, attn_mode, b, t, grad, device))
    val = torch.from_numpy(inputs.val_tokens.astype(np.int64))
    log(f"train_shards: {len(inputs.train)}")
    log(f"val_tokens: {evaluator.n}")
    log(f"val_bytes: {int(count_bytes(val[:-1], val[1:], luts).sum())}")
    return Session(hp, inputs, device, cfg, attn_mode, log, log_path, env, code_sha256, len(code), evaluator)

@dataclasses.dataclass
class Trained:
    model: GPT  # the EMA weights (EXPORT_ONLY: the checkpoint's)
    cfg: ModelConfig  # as trained: no recurrence if it never switched on
    score: object  # the evaluator's NLL function of `model`
    result: TrainResult | None  # None under EXPORT_ONLY

def train_or_load(s: Session) -> Trained:
    """Train from SEED's init, or (EXPORT_ONLY) load the checkpoint."""
    hp = s.hp
    torch.manual_seed(hp.seed)
    base = build_model(s.cfg, s.device, s.attn_mode)
    s.log(f"model_params:{count_params(s.cfg)}")
    if hp.export_only:
        base.load_state_dict(s.inputs.checkpoint[1])
        base.recur_active = bool(s.cfg.recur_layers)
        s.log(f"export_only: {hp.export_only} model config: {dataclasses.asdict(s.cfg)}")
        return Trained(base, s.cfg, s.evaluator.plain(base), None)
    model = torch.compile(base, dynamic=False, fullgraph=True) if hp.use_compile else base
    if hp.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[s.device.index] if s.device.type == "cuda" else None, broadcast_buffers=False)
    ns_fn = torch.compile(muoneq_r_update) if hp.use_compile else muoneq_r_update
    score = s.evaluator.plain(base)
    result = train(hp, base, model, s.device, lambda: s.stream(hp.seed, hp.train_seqs),
                   lambda: s.evaluator.evaluate(score, s.evaluator.L), s.log, ns_fn)
    cfg = s.cfg if base.recur_active else dataclasses.replace(s.cfg, recur_layers=())  # never switched on: as trained
    return Trained(base, cfg, score, result)

@dataclasses.dataclass
class Quantized:
    entries: dict  # name -> codes and steps (or fp16 data)
    blob: bytes  # the compressed artifact (rank 0)
    predicted: float  # predicted model bytes
    compress_ms: float  # the verifying compression(s), timed apart from the search
    hessians: dict
    gptq_ms: float  # calibration + search: counts as training

def quantize(s: Session, trained: Trained) -> Quantized | None:
    """GPTQ calibration on training data and the rate search, inside the training budget, spread over ranks.
    None when the limit cannot be met (logged)."""
    hp, log = s.hp, s.log
    sync(s.device)
    t0 = time.perf_counter()
    calib = s.stream(hp.seed + 1, hp.train_seqs // hp.grad_accum)  # one micro-batch per rank per call
    n_batches = max(1, hp.gptq_calibration_batches // hp.world_size)
    hessians = collect_hessians(trained.model, (calib.next_batch() for _ in range(n_batches)), s.device,
                                hp.world_size)
    sync(s.device)
    hess_ms = 1000 * (time.perf_counter() - t0)
    search = RateSearch(trained.model, hessians, hp.gptq_enabled, hp.rank, hp.world_size)
    try:
        entries, blob, knob, predicted, search_ms, compress_ms = export_model(
            search, trained.cfg, s.code_bytes, hp.artifact_bytes_limit, s.device, log)
    except FitError as e:
        log(f"error: {e}")
        return None
    gptq_ms = hess_ms + search_ms
    log(f"gptq:hessians {len(hessians)} from {n_batches * hp.world_size} batches in {hess_ms:.0f}ms")
    kinds = {k: [e.get("q", e.get("data")).numel() for e in entries.values() if e["kind"] == k] for k in STREAMS}
    log(f"gptq:quantized in {search_ms:.0f}ms ({'full GPTQ' if hp.gptq_enabled else 'round-to-nearest'}): "
        + " ".join(f"{k}: {len(v)} tensors / {sum(v)} params" for k, v in kinds.items() if k != "scale"))
    for line in search.report(entries, knob, predicted + s.code_bytes, hp.artifact_bytes_limit):
        log(line)
    if gptq_ms > 1000 * hp.gptq_reserve_seconds:
        log(f"WARNING: GPTQ took {gptq_ms:.0f}ms, over GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds:g}")
    train_ms = trained.result.train_ms if trained.result else 0.0
    log(f"training_budget: train_ms: {train_ms:.0f} gptq_ms: {gptq_ms:.0f} "
        f"total_ms: {train_ms + gptq_ms:.0f} limit_ms: {1000 * hp.max_wallclock_seconds:.0f}")
    return Quantized(entries, blob, predicted, compress_ms, hessians, gptq_ms)

def write_artifact(s: Session, trained: Trained, q: Quantized) -> int | None:
    """Rank 0 saves final_model.pt (after training), prunes what is still over the limit, writes the artifact and
    checks it unpacks to the quantizer's tensors. Returns its bytes (0 on other ranks), None on failure."""
    hp, log = s.hp, s.log
    status, size = torch.zeros(1, device=s.device), 0
    if hp.rank == 0:
        if not hp.export_only:
            log(f"Serialized model: {save_checkpoint(Path(hp.out_dir) / 'final_model.pt', trained.model, trained.cfg)}"
                " bytes")
        log(f"Code size: {s.code_bytes} bytes")
        try:
            t0 = time.perf_counter()
            packed, blob = prune_to_fit(q.entries, q.blob, trained.cfg, q.hessians, s.code_bytes,
                                        hp.artifact_bytes_limit, log)
            write_atomic(s.artifact_path, blob)
            size = s.artifact_path.stat().st_size
            write_ms = q.compress_ms + 1000 * (time.perf_counter() - t0)
            log(f"export: predicted {q.predicted:.0f} actual {size} model bytes "
                f"({100 * (size / q.predicted - 1):+.2f}%), compress+write {write_ms:.0f}ms")
            log(f"Serialized model int6+brotli: {size} bytes")
            log(f"Total submission size int6+brotli: {size + s.code_bytes} bytes")
            check_roundtrip(packed, load_artifact(s.artifact_path)[1])
            status += 1
        except FitError as e:
            log(f"error: {e}")
    if hp.world_size > 1:
        dist.broadcast(status, 0)
    return size if status.item() else None

def final_evals(s: Session, cfg: ModelConfig, entries: dict, written: Path | None = None) -> tuple:
    """Dequantize the artifact into a fresh model and run every enabled evaluation strategy: ({name: result},
    the name of the reported one). A non-finite score raises Diverged; when a plain evaluation of the artifact
    this run `written` is non-finite, the artifact is broken and is removed first."""
    hp, ev, log = s.hp, s.evaluator, s.log
    model = build_model(cfg, s.device, s.attn_mode)
    model.load_state_dict({k: v.to(s.device) for k, v in dequantize_entries(entries).items()})
    model.recur_active = bool(cfg.recur_layers)
    model.requires_grad_(False)
    plain = ev.plain(model)
    runs = [("final_int6_roundtrip", "", lambda d: ev.evaluate(plain, ev.L, d))]  # (name, dump suffix, eval)
    if hp.sliding_window_enabled:
        runs.append(("final_int6_sliding_window", "", lambda d: ev.evaluate(plain, hp.eval_stride, d)))
    reported = runs[-1][0]
    if hp.ttt_enabled:
        ttt = evaluate_lora_ttt if hp.ttt_mode == "lora" else evaluate_ttt
        runs.append(("final_int6_ttt", ".ttt", lambda d: ttt(ev, model, hp, d, log)))
    if hp.slot_enabled:
        log("slot: context-only SLOT is an eval-time optimization; its score is a non-record result")
        runs.append(("final_int6_slot", ".slot",
                     lambda d: ev.evaluate(ev.slot(model, hp.slot_steps, hp.slot_lr), hp.eval_stride, d)))
    results, total_ms = {}, 0.0
    for name, suffix, fn in runs:
        dump = hp.dump_token_nll and (name == reported or suffix)
        r = fn(bool(dump))
        total_ms += r["ms"]
        log(f"{name} val_loss:{r['loss']:.8f} val_bpb:{r['bpb']:.8f} eval_time:{r['ms']:.0f}ms")
        log(f"eval_attention: {name} {r['attention']}")
        if not math.isfinite(r["bpb"]):
            if suffix or written is None:  # TTT/SLOT diverged, or EVAL_ONLY's own input: the file is not ours to judge
                raise Diverged(f"{name} is not finite: no result (the artifact is left as it is)")
            if hp.rank == 0:
                written.unlink(missing_ok=True)
            raise Diverged(f"{name} is not finite: the artifact does not evaluate, so {written} was removed "
                           "(final_model.pt is kept)")
        if dump and hp.rank == 0:
            path = Path(hp.dump_token_nll)
            path = path.with_name(path.stem + suffix + ".npy") if suffix else path
            np.save(path, r["nll"].astype(np.float32))
            log(f"dump_token_nll: {name} -> {path} ({len(r['nll'])} targets)")
        results[name] = r
    log(f"eval_total: {total_ms:.0f}ms")
    if total_ms > 600_000:
        log(f"WARNING: evaluations took {total_ms / 1000:.0f}s, over the challenge's 600s evaluation limit")
    return results, reported

def summary(s: Session, model_bytes: int, evals: dict, reported: str, trained=None, q=None, pre=None) -> dict:
    """The run's machine-readable record, logged last as `summary: {json}` (make_record.py reads it)."""
    hp, r = s.hp, trained.result if trained else None
    train_ms = r.train_ms if r else 0.0
    result = lambda e: dict(val_loss=e["loss"], val_bpb=e["bpb"], eval_ms=round(e["ms"]))
    return {
        "run_id": hp.run_id,
        "mode": "eval_only" if hp.eval_only else "export_only" if hp.export_only else "train",
        "seed": hp.seed,
        "code_sha256": s.code_sha256,
        "code_bytes": s.code_bytes,
        "model_bytes": model_bytes,
        "total_bytes": model_bytes + s.code_bytes,
        "bytes_limit": hp.artifact_bytes_limit,
        "model_params": count_params(s.cfg),
        "steps": r.steps if r else None,
        "stopped_early": r.stopped_early if r else None,
        "train_ms": round(train_ms) if q else None,
        "gptq_ms": round(q.gptq_ms) if q else None,
        "train_total_ms": round(train_ms + q.gptq_ms) if q else None,
        "train_limit_ms": round(1000 * hp.max_wallclock_seconds) if q else None,
        "pre_quant": result(pre) if pre else None,
        "scores": {name: result(e) for name, e in evals.items()},
        "score_line": reported,
        "val_loss": evals[reported]["loss"],
        "val_bpb": evals[reported]["bpb"],
        "eval_total_ms": round(sum(e["ms"] for e in evals.values())),
        "peak_memory_mib": r.peak_memory_mib if r else None,
        "env": s.env,
        "settings": hp.non_default,
        "curve": r.curve if r else dict(train=[], val=[]),
    }

def count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())

def finite_or_null(x, where: str = "", bad: list | None = None):
    """`x` with every NaN or infinity replaced by None (null in JSON), recursively; their paths go to `bad`."""
    if isinstance(x, float) and not math.isfinite(x):
        if bad is not None:
            bad.append(where)
        return None
    if isinstance(x, dict):
        return {k: finite_or_null(v, f"{where}.{k}" if where else str(k), bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", bad) for i, v in enumerate(x)]
    return x

def strict_json(x) -> str:
    """JSON without NaN or infinity (they become null), so any JSON reader takes the summary line."""
    return json.dumps(finite_or_null(x), allow_nan=False)

def run(hp: Hyperparameters, inputs: Inputs) -> int:
    """Start, then the pipeline. A divergence, seen by every rank at the same point, ends it with one `error:` line
    (stderr and the log) and exit code 1."""
    s = start_run(hp, inputs)
    try:
        return pipeline(s)
    except Diverged as e:
        if hp.rank == 0:
            report_failure(hp, f"error: {e}")
        return 1

def pipeline(s: Session) -> int:
    """Train (or load EXPORT_ONLY's checkpoint), quantize, evaluate the raw weights, write the artifact, evaluate
    it; EVAL_ONLY only evaluates its artifact. The last line is the summary."""
    hp, inputs = s.hp, s.inputs
    if hp.eval_only:
        size = Path(hp.eval_only).stat().st_size
        s.log(f"eval_only: {hp.eval_only} model config from the artifact: {dataclasses.asdict(s.cfg)}")
        s.log(f"Serialized model int6+brotli: {size} bytes")
        s.log(f"Code size: {s.code_bytes} bytes")
        s.log(f"Total submission size int6+brotli: {size + s.code_bytes} bytes")
        evals, reported = final_evals(s, s.cfg, inputs.artifact[1])
        s.log("summary: " + strict_json(summary(s, size, evals, reported)))
        return 0
    trained = train_or_load(s)
    q = quantize(s, trained)
    if q is None:
        return 1
    pre = s.evaluator.evaluate(trained.score, s.evaluator.L)
    s.log(f"pre-quantization post-ema val_loss:{pre['loss']:.8f} val_bpb:{pre['bpb']:.8f} eval_time:{pre['ms']:.0f}ms")
    if not math.isfinite(pre["bpb"]):
        raise Diverged("the pre-quantization score is not finite; nothing written")
    model_bytes = write_artifact(s, trained, q)
    if model_bytes is None:
        return 1
    evals, reported = final_evals(s, trained.cfg, load_artifact(s.artifact_path)[1], s.artifact_path)
    s.log(f"artifact: {s.artifact_path.resolve()}")
    s.log(f"log: {s.log_path.resolve()}")
    s.log("summary: " + strict_json(summary(s, model_bytes, evals, reported, trained, q, pre)))
    return 0

def report_failure(hp, text: str):
    """stderr, and on rank 0 the run's log file too (once it exists)."""
    print(text, file=sys.stderr, flush=True)
    path = run_log_path(hp) if hp is not None and hp.run_id else None
    if path is not None and hp.rank == 0 and path.is_file():
        with open(path, "a", encoding="utf-8") as f:
            print(text, file=f)

ABORT_KEY, ENDED_KEY = "train_gpt_abort", "train_gpt_ended"

class PeerWatchdog:
    """Ends every rank within seconds when one fails, whatever the others are blocked in (under NCCL a rank
    waiting in a collective for a dead peer may never return), without relying on the launcher: the failing
    rank posts its traceback under ABORT_KEY in the process group's store; a daemon thread on every rank polls
    that key (a lost store also counts: its host has ended), reports it (rank 0 into the log too), removes
    write_atomic's temporary files and calls os._exit(1). The failing rank waits until every rank has ended
    (a few seconds at most), so that a launcher killing the rest cannot cut the reports short."""

    active = None  # this process's watchdog, once the process group exists

    def __init__(self, store, hp, poll: float = 0.25):
        self.store, self.hp, self.poll = store, hp, poll
        self.stopped = threading.Event()

    @classmethod
    def start(cls, store, hp):
        try:  # its own connection, so the polls never queue behind a blocking store call of the main thread
            store = store.clone()
        except (AttributeError, RuntimeError):  # older torch: share the process group's connection
            pass
        cls.active = wd = cls(store, hp)
        threading.Thread(target=wd._watch, name="peer-watchdog", daemon=True).start()

    def _watch(self):
        while not self.stopped.wait(self.poll):
            try:
                if not self.store.check([ABORT_KEY]):
                    continue
                why = self.store.get(ABORT_KEY).decode(errors="replace")
            except Exception as e:
                if self.stopped.wait(2.0):  # the group is shutting down after a clean run
                    return
                why = f"the process group's store is gone ({type(e).__name__}: {e})"
            if self.stopped.is_set():
                return
            report_failure(self.hp, f"error: rank {self.hp.rank} ends because a peer failed:\n{why}")
            for p in list(TEMP_FILES):
                p.unlink(missing_ok=True)
            self.exit(1)

    def post(self, text: str) -> str:
        """Called by a failing rank: stop watching, post `text` unless a peer failed first; returns the first."""
        self.stopped.set()
        try:
            return self.store.compare_set(ABORT_KEY, "", text).decode(errors="replace")
        except Exception:
            return text

    def exit(self, rc: int, timeout: float = 10.0):
        """Count this rank as ended, wait (at most `timeout`) until every rank is, and end the process. Rank 0 may
        host the store, so it leaves last: a peer's last store call does not hit a closed socket."""
        try:
            ended, deadline = self.store.add(ENDED_KEY, 1), time.monotonic() + timeout
            while ended < self.hp.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                ended = self.store.add(ENDED_KEY, 0)
            if self.hp.rank == 0:
                time.sleep(0.5)
        except Exception:  # the store went with its host
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)

def main(env=None) -> int:
    env = dict(os.environ if env is None else env)
    hp = None
    try:
        hp = Hyperparameters.from_env(env)
        if hp.smoke:
            ensure_smoke_data(hp)
        rc = run(hp, preflight(hp))
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while a peer still finishes (gloo aborted 1 run in ~15)
    except ConfigError as e:
        rc, text = 2, f"error: {e}"
        if int(env.get("RANK", "0")) == 0:
            print(text, file=sys.stderr)
    except (Exception, KeyboardInterrupt) as e:
        rc, text = 1, f"error: rank {env.get('RANK', '0')}: {type(e).__name__}: {e}\n{traceback.format_exc()}".rstrip()
        report_failure(hp, text)
    else:
        if PeerWatchdog.active is not None:
            PeerWatchdog.active.stopped.set()
            PeerWatchdog.active = None
        if dist.is_initialized():
            dist.destroy_process_group()
        return rc
    wd = PeerWatchdog.active
    if wd is None:  # one process, or no process group yet
        return rc
    # peers may be blocked in a collective with this rank: end them first, then this process (tearing the group
    # down could block on them)
    first = wd.post(text)
    if first != text and rc == 1:
        report_failure(hp, f"error: rank {hp.rank}'s error above may follow from a peer's earlier one:\n{first}")
    wd.exit(rc)

if __name__ == "__main__":
    sys.exit(main())
