"""Evaluation: sliding-window coverage, Evaluator vs a straightforward computation, per-target dumps,
causality of sliding / TTT / SLOT, and the equalities that pin TTT and SLOT to the plain eval.

Everything here is in-process on a tiny random model (CPU, well under a second per evaluation).
Token index semantics: the Evaluator's tokens array has n+1 entries; target t (1..n) is tokens[t],
predicted from tokens[:t]; its NLL sits at dump index t-1.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_gpt as t
from conftest import ROOT, random_gpt, run_train

V = 64
SEQ = 32
STRIDE = 12  # does not divide SEQ
CPU = torch.device("cpu")
ATOL = 1e-5


# ---------------------------------------------------------------- helpers

make_model = random_gpt  # vocab V=64, every path active


def make_luts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 4, (V,), generator=g).to(torch.int16)
    space = torch.rand(V, generator=g) < 0.4
    boundary = torch.rand(V, generator=g) < 0.1
    base[boundary] = 0
    return base, space, boundary


def make_tokens(n_targets: int, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=n_targets + 1).astype(np.uint16)


def evaluator(tokens, seq_len=SEQ, batch_windows=4, luts=None):
    return t.Evaluator(tokens, seq_len, seq_len * batch_windows, luts or make_luts(), CPU)


def score(ev, model, stride, dump=False, slot=None):
    """Plain scoring, or context-only SLOT with slot = (steps, lr)."""
    return ev.evaluate(ev.slot(model, *slot) if slot else ev.plain(model), stride, dump=dump)


def changed_after(tokens: np.ndarray, p: int, seed: int = 3) -> np.ndarray:
    """Copy with every token at index >= p replaced by a different one."""
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    out[p:] = (tokens[p:].astype(np.int64) + rng.integers(1, V, size=len(tokens) - p)) % V
    assert (out[p:] != tokens[p:]).all()
    return out


def ttt_hp(**over) -> t.Hyperparameters:
    env = dict(TRAIN_SEQ_LEN=str(SEQ), TRAIN_BATCH_TOKENS=str(SEQ * 8), EVAL_STRIDE=str(STRIDE), VOCAB_SIZE=str(V),
               NUM_LAYERS="3", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", RECUR_LAYERS="1",
               VE_LAYERS="1,2", PARALLEL_START_LAYER="2", XSA_LAST_N="3", TTT_ENABLED="1",
               TTT_CHUNK_TOKENS="48", TTT_EPOCHS="1", TTT_LR="0.05", TTT_BATCH_SEQS="2")
    env.update({k: str(v) for k, v in over.items()})
    return t.Hyperparameters.from_env(env)


def assert_causal(nll_a, nll_b, p):
    """Targets < p (dump indices < p-1) identical; targets >= p actually changed."""
    nll_a, nll_b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    before = np.abs(nll_a[:p - 1] - nll_b[:p - 1])
    assert before.max(initial=0.0) <= ATOL, (
        f"NLL of target {int(before.argmax()) + 1} < p={p} changed by {before.max():.3g} when tokens >= p changed")
    after = np.abs(nll_a[p - 1:] - nll_b[p - 1:])
    assert (after > 1e-4).mean() > 0.5, "changing tokens >= p barely changed their NLLs: the check is vacuous"


# ---------------------------------------------------------------- sliding_windows


def _combos():
    out = []
    for L in (1, 3, 16, 64, 128):
        for S in sorted({1, 3, 5, 7, 16, 48, L}):
            if S > L:
                continue
            for n in (1, 2, 5, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 1000, 1001):
                out.append((n, L, S))
    return out


def test_sliding_windows_cover_every_target_once():
    for n, seq_len, S in _combos():
        wins = t.sliding_windows(n, seq_len, S)
        L = min(seq_len, n)
        hits = np.zeros(n + 2, dtype=np.int64)
        for k, (start, fs) in enumerate(wins):
            assert start >= 0 and start + L <= n, (n, seq_len, S, start)
            assert 0 <= fs < L, (n, seq_len, S, start, fs)
            hits[start + fs + 1:start + L + 1] += 1
            if k == 0:
                assert (start, fs) == (0, 0), (n, seq_len, S)
            else:
                assert fs >= L - S, f"{(n, seq_len, S)}: window {k} scores with only {fs} context < L-S"
                assert start > wins[k - 1][0], (n, seq_len, S)
        assert hits[0] == 0 and hits[n + 1] == 0
        assert (hits[1:n + 1] == 1).all(), f"{(n, seq_len, S)}: targets scored {sorted(set(hits[1:n + 1]))} times"
        # no wasted windows: one per stride step plus at most one aligned tail
        assert len(wins) <= max(0, math.ceil((n - L) / S)) + 1, (n, seq_len, S, len(wins))


def test_sliding_windows_examples():
    assert t.sliding_windows(10, 4, 4) == [(0, 0), (4, 0), (6, 2)]
    assert t.sliding_windows(10, 4, 2) == [(0, 0), (2, 2), (4, 2), (6, 2)]
    assert t.sliding_windows(3, 8, 2) == [(0, 0)]


# ---------------------------------------------------------------- Evaluator vs a straightforward computation


def test_stride_equal_seq_len_matches_straightforward_eval():
    model, luts = make_model(), make_luts()
    n = SEQ * 7
    tokens = make_tokens(n)
    ev = evaluator(tokens, batch_windows=3, luts=luts)  # 7 windows in batches of 3: a ragged last batch
    r = score(ev, model, SEQ, dump=True)
    tok = torch.from_numpy(tokens.astype(np.int64))
    x, y = tok[:-1].view(-1, SEQ), tok[1:].view(-1, SEQ)
    with torch.no_grad():
        loss = model(x, y).item()
        per_pos = model.forward_nll(x, y).reshape(-1)
    nbytes = int(t.count_bytes(x, y, luts).sum())
    assert nbytes > 0
    assert r["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert r["bpb"] == pytest.approx(loss * n / (math.log(2) * nbytes), rel=1e-6)
    np.testing.assert_allclose(r["nll"], per_pos.numpy(), atol=ATOL, rtol=0)
    assert 2.0 < r["loss"] < 12.0  # a real, non-uniform model (log 64 = 4.16)


@pytest.mark.parametrize("n,stride", [(150, STRIDE), (150, SEQ), (20, STRIDE), (SEQ, STRIDE), (SEQ + 1, 5),
                                      (97, 1)])
def test_dump_has_one_value_per_target(n, stride):
    model = make_model()
    ev = evaluator(make_tokens(n, seed=n))
    stride = min(stride, ev.L)
    r = score(ev, model, stride, dump=True)
    nll = r["nll"]
    assert nll.shape == (n,)
    assert np.isfinite(nll).all() and (nll > 0).all()
    assert float(nll.astype(np.float64).sum()) / n == pytest.approx(r["loss"], rel=1e-5)
    # no-dump evaluation gives the same loss
    assert score(ev, model, stride)["loss"] == pytest.approx(r["loss"], rel=1e-7, abs=1e-7)


def test_sliding_first_window_matches_plain_and_later_targets_differ():
    """Targets of the first window are scored identically by any stride; later targets get different
    (longer-context) NLLs from sliding eval, so the stride really changes the computation."""
    model = make_model()
    ev = evaluator(make_tokens(200))
    plain = score(ev, model, SEQ, dump=True)["nll"]
    slide = score(ev, model, STRIDE, dump=True)["nll"]
    np.testing.assert_allclose(slide[:SEQ], plain[:SEQ], atol=ATOL, rtol=0)
    assert np.abs(slide[SEQ:] - plain[SEQ:]).max() > 1e-3


# ---------------------------------------------------------------- causality


N_CAUSAL = 200
# p=99, 110: not multiples of the stride (12), the window length (32) or the TTT chunk (48), and not window
# starts (99 sits 2 targets into TTT chunk 2, catching training past a chunk end); p=20: inside the first window.
CAUSAL_P = [99, 110, 20]


# the techniques beyond the reference, all on (SmearGate reads the previous position; the gate its own input), at p=99
ALL_ON = dict(smear_gate=True, attn_out_gate="dense", recur_passes=3)
FEATURES = pytest.mark.parametrize("p,over", [pytest.param(p, {}, id=str(p)) for p in CAUSAL_P] +
                                   [pytest.param(99, ALL_ON, id="99-all-on")])


@FEATURES
def test_sliding_eval_is_causal(p, over):
    model = make_model(**over)
    tokens = make_tokens(N_CAUSAL)
    ev_a, ev_b = evaluator(tokens), evaluator(changed_after(tokens, p))
    for stride in (STRIDE, SEQ):
        assert_causal(score(ev_a, model, stride, dump=True)["nll"], score(ev_b, model, stride, dump=True)["nll"], p)


@FEATURES
def test_ttt_eval_is_causal(p, over):
    model = make_model(**over)
    hp = ttt_hp()
    tokens = make_tokens(N_CAUSAL)
    a = t.evaluate_ttt(evaluator(tokens), model, hp, dump=True, log=lambda *_: None)["nll"]
    b = t.evaluate_ttt(evaluator(changed_after(tokens, p)), model, hp, dump=True, log=lambda *_: None)["nll"]
    assert_causal(a, b, p)


@FEATURES
def test_slot_eval_is_causal(p, over):
    model = make_model(**over)
    tokens = make_tokens(N_CAUSAL)
    slot = (4, 0.1)
    a = score(evaluator(tokens), model, STRIDE, dump=True, slot=slot)["nll"]
    b = score(evaluator(changed_after(tokens, p)), model, STRIDE, dump=True, slot=slot)["nll"]
    assert_causal(a, b, p)


# ---------------------------------------------------------------- TTT / SLOT equalities


def test_ttt_with_zero_lr_equals_sliding_eval():
    model = make_model()
    ev = evaluator(make_tokens(N_CAUSAL))
    plain = score(ev, model, STRIDE, dump=True)
    ttt = t.evaluate_ttt(ev, model, ttt_hp(TTT_LR="0"), dump=True, log=lambda *_: None)
    np.testing.assert_allclose(ttt["nll"], plain["nll"], atol=ATOL, rtol=0)
    assert ttt["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert ttt["bpb"] == pytest.approx(plain["bpb"], abs=1e-6)


def test_ttt_first_chunk_scored_before_any_update():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = evaluator(make_tokens(N_CAUSAL))
    hp = ttt_hp()
    C = hp.ttt_chunk_tokens
    plain = score(ev, model, STRIDE, dump=True)["nll"]
    ttt = t.evaluate_ttt(ev, model, hp, dump=True, log=lambda *_: None)["nll"]
    np.testing.assert_allclose(ttt[:C], plain[:C], atol=ATOL, rtol=0)  # targets 1..C: chunk 0
    assert np.abs(ttt[2 * C:] - plain[2 * C:]).max() > 1e-3, "TTT with a non-zero lr changed nothing"
    # the caller's model is untouched (TTT adapts a copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in model.parameters())


def test_slot_zero_steps_equals_sliding_eval():
    model = make_model()
    ev = evaluator(make_tokens(N_CAUSAL))
    plain = score(ev, model, STRIDE, dump=True)
    slot0 = score(ev, model, STRIDE, dump=True, slot=(0, 0.5))
    np.testing.assert_allclose(slot0["nll"], plain["nll"], atol=ATOL, rtol=0)
    assert slot0["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    slot = score(ev, model, STRIDE, dump=True, slot=(4, 0.1))
    # SLOT needs context: the first window's targets are scored plainly; later ones change
    np.testing.assert_allclose(slot["nll"][:SEQ], plain["nll"][:SEQ], atol=ATOL, rtol=0)
    assert np.abs(slot["nll"][SEQ:] - plain["nll"][SEQ:]).max() > 1e-3


# ---------------------------------------------------------------- SLOT: one delta per window


def test_slot_windows_do_not_share_delta_in_evaluator(monkeypatch):
    model = make_model()
    tokens = make_tokens(N_CAUSAL)
    sizes, real = [], t.slot_nll

    def spy(model, x, *a, **k):
        sizes.append(x.size(0))
        return real(model, x, *a, **k)

    monkeypatch.setattr(t, "slot_nll", spy)
    one = score(evaluator(tokens, batch_windows=1), model, STRIDE, dump=True, slot=(4, 0.1))
    assert sizes and max(sizes) == 1
    sizes.clear()
    many = score(evaluator(tokens, batch_windows=8), model, STRIDE, dump=True, slot=(4, 0.1))
    assert max(sizes) > 1, "the Evaluator never batched several windows: the check would be vacuous"
    np.testing.assert_allclose(many["nll"], one["nll"], atol=ATOL, rtol=0)


def test_slot_nll_batch_equals_each_window_alone():
    model = make_model()
    tok = torch.from_numpy(make_tokens(N_CAUSAL).astype(np.int64))
    starts = [12, 40, 77, 130]
    x = torch.stack([tok[s:s + SEQ] for s in starts])
    y = torch.stack([tok[s + 1:s + SEQ + 1] for s in starts])
    s0 = SEQ - STRIDE
    batched = t.slot_nll(model, x, y, s0, 5, 0.1, CPU)
    assert batched.shape == (len(starts), SEQ - s0)
    with torch.no_grad():
        plain = model.forward_nll(x, y, s0)
    assert (batched - plain).abs().max() > 1e-3  # SLOT does something
    for i in range(len(starts)):
        alone = t.slot_nll(model, x[i:i + 1], y[i:i + 1], s0, 5, 0.1, CPU)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=ATOL, rtol=0)
    # the delta only sees context targets (< s0): changing scored targets leaves other positions' NLL alone
    y2 = y.clone()
    y2[:, s0 + 3] = (y2[:, s0 + 3] + 1) % V
    moved = t.slot_nll(model, x, y2, s0, 5, 0.1, CPU)
    keep = [j for j in range(SEQ - s0) if j != 3]
    torch.testing.assert_close(moved[:, keep], batched[:, keep], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- attention kernels in evaluations


def test_evaluations_fall_back_to_other_sdpa_kernels_and_record_which_ran(monkeypatch):
    """Training pins SDPA to the kernel the probe chose. A shape that kernel refuses must not fail an evaluation:
    cuDNN refuses sequence length 1, which TTT trains on when TTT_CHUNK_TOKENS mod EVAL_SEQ_LEN = 1. On CPU a
    stand-in plays the pinned kernel: while SDPA may use only it, length 1 raises "No available kernel" (SDPA's own
    words). The Evaluator lets every kernel in, the pinned one first, and records which one SDPA picks per shape."""
    real = F.scaled_dot_product_attention

    def pinned_refuses_length_1(q, k, v, **kw):
        if q.size(2) == 1 and not torch.backends.cuda.math_sdp_enabled():
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", pinned_refuses_length_1)
    model, hp = make_model(), ttt_hp(TTT_CHUNK_TOKENS=str(2 * SEQ + 1))  # chunk pieces of SEQ, SEQ and 1 tokens
    tokens = make_tokens(3 * SEQ + 4)  # two chunks
    kernel_of = lambda b, n, grad: t.attention_kernel(model.cfg, "sdpa", b, n, grad, CPU)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the pin, as training runs under it
        with pytest.raises(RuntimeError, match="No available kernel"):
            t.evaluate_ttt(evaluator(tokens), model, hp, log=lambda *_: None)
        ev = t.Evaluator(tokens, SEQ, SEQ * 4, make_luts(), CPU, kernels=["flash", "cudnn", "efficient", "math"],
                         kernel_of=kernel_of)
        ttt = t.evaluate_ttt(ev, model, hp, log=lambda *_: None)
        assert math.isfinite(ttt["bpb"]) and "flash at 1x1 (training)" in ttt["attention"], ttt["attention"]
        assert "flash at 2x32 (training)" in ttt["attention"]  # and the full-length pieces
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()  # pin back
        ev.kernels = ["math"]  # what is recorded is SDPA's choice under the evaluation's kernels
        assert score(ev, model, SEQ)["attention"] == "math at 3x32, math at 1x32"


def test_a_non_finite_score_of_the_written_artifact_removes_it(tmp_path):
    """An artifact whose own evaluation is not finite must not look like a result: the run's artifact is removed
    (the error names it); under EVAL_ONLY (no `written`), the file given is left alone. Either way: Diverged."""
    from types import SimpleNamespace
    model = make_model()
    entries = {n: dict(kind="fp16", data=p.detach().half()) for n, p in model.named_parameters()}
    entries["skip_weights"]["data"][0, 0] = float("inf")  # e.g. a weight over fp16's range
    logs = []
    s = SimpleNamespace(hp=ttt_hp(), evaluator=evaluator(make_tokens(3 * SEQ)), log=logs.append, device=CPU,
                        attn_mode="sdpa")
    art = tmp_path / "final_model.int6.ptz"
    art.write_bytes(b"artifact")
    with pytest.raises(t.Diverged, match=f"^final_int6_roundtrip is not finite: the artifact does not evaluate, so "
                                         f"{art} was removed"):
        t.final_evals(s, model.cfg, entries, art)
    assert not art.exists() and logs[0].startswith("final_int6_roundtrip val_loss:nan")
    art.write_bytes(b"artifact")
    with pytest.raises(t.Diverged, match=r"no result \(the artifact is left as it is\)"):
        t.final_evals(s, model.cfg, entries)
    assert art.exists() and not any("final_int6_ttt" in l for l in logs)  # nothing after the first bad score


# ---------------------------------------------------------------- LoRA TTT (TTT_MODE=lora): documents cut at BOS

DOC_LENGTHS = [40, 7, 90, 25, 60, 13, 33, 25, 45]  # several longer than SEQ (32): windows capped at SEQ
DOC_STARTS = np.cumsum([0] + DOC_LENGTHS[:-1])  # 0, 40, 47, 137, 162, 222, 235, 268, 293; n = 338
# p=68: inside document 2 (phase 2 of 3 over the first 5 documents), off the chunk grid (8); p=250: in the rest
LORA_P = [68, 250]


def make_docs(lengths=DOC_LENGTHS, seed: int = 4) -> np.ndarray:
    """A stream of documents [BOS, tokens...] with these target counts (the last predicts no next BOS)."""
    rng = np.random.default_rng(seed)
    docs = [np.r_[t.BOS_ID, rng.integers(2, V, size=k - 1)] for k in lengths]
    return np.concatenate(docs + [rng.integers(2, V, size=1)]).astype(np.uint16)


def lora_hp(**over) -> t.Hyperparameters:
    kw = dict(TTT_MODE="lora", TTT_LORA_RANK=4, TTT_LORA_LR=0.03, TTT_LORA_WD=0.1, TTT_LORA_CHUNK_TOKENS=8,
              TTT_LORA_BATCH_DOCS=3, TTT_PHASES=3, TTT_PREFIX_DOCS=5, TTT_LR=0.05, TTT_EPOCHS=1)
    return ttt_hp(**{**kw, **over})


def lora_eval(tokens, hp, **kw):
    return t.evaluate_lora_ttt(evaluator(tokens, **kw), make_model(), hp, dump=True, log=lambda *_: None)


def test_documents_cut_at_bos_and_cover_every_target_once():
    tokens = make_docs()
    docs = t.documents(tokens)
    np.testing.assert_array_equal(docs, np.stack([DOC_STARTS, DOC_LENGTHS], 1))
    assert docs[-1].sum() == len(tokens) - 1
    no_bos = make_tokens(50) % (V - 2) + 2  # a stream that does not start with BOS: one document
    np.testing.assert_array_equal(t.documents(no_bos), [[0, 50]])
    assert [t.lora_window(ci, 8, 32) for ci in range(6)] == [(0, 8), (0, 16), (0, 32), (0, 32), (8, 32), (16, 32)]


@pytest.mark.parametrize("phases,p", [(0, LORA_P[0]), (3, LORA_P[0]), (3, LORA_P[1])])
def test_lora_ttt_is_causal(phases, p):
    hp = lora_hp(TTT_PHASES=phases)
    tokens = make_docs()
    assert_causal(lora_eval(tokens, hp)["nll"], lora_eval(changed_after(tokens, p), hp)["nll"], p)


def test_lora_ttt_scores_every_target_once_with_the_sliding_bytes():
    tokens = make_docs()
    ev = evaluator(tokens)
    slide = score(ev, make_model(), STRIDE, dump=True)
    r = t.evaluate_lora_ttt(ev, make_model(), lora_hp(), dump=True, log=lambda *_: None)
    assert r["nll"].shape == (ev.n,) and np.isfinite(r["nll"]).all() and (r["nll"] > 0).all()
    assert float(r["nll"].astype(np.float64).sum()) / ev.n == pytest.approx(r["loss"], rel=1e-5)
    nbytes = lambda e: e["loss"] * ev.n / (math.log(2) * e["bpb"])
    assert nbytes(r) == pytest.approx(nbytes(slide), rel=1e-9)


def test_lora_rank0_scores_each_document_alone():
    """No adapters, no phases: each document's NLLs are those of a plain forward over that document alone (for
    documents up to SEQ long; longer ones are scored in capped windows); LoRA with lr 0 changes nothing; with a
    real lr it changes the later chunks."""
    tokens = make_docs()
    model = make_model()
    alone = lora_eval(tokens, lora_hp(TTT_LORA_RANK=0, TTT_PHASES=0))["nll"]
    tok = torch.from_numpy(tokens.astype(np.int64))
    for s, k in zip(DOC_STARTS, DOC_LENGTHS):
        if k <= SEQ:
            with torch.no_grad():
                want = model.forward_nll(tok[None, s:s + k], tok[None, s + 1:s + k + 1])[0]
            np.testing.assert_allclose(alone[s:s + k], want.numpy(), atol=ATOL, rtol=0)
    lr0 = lora_eval(tokens, lora_hp(TTT_LORA_LR=0, TTT_PHASES=0))["nll"]
    np.testing.assert_allclose(lr0, alone, atol=ATOL, rtol=0)
    lora = lora_eval(tokens, lora_hp(TTT_PHASES=0))["nll"]
    np.testing.assert_allclose(lora[:8], alone[:8], atol=ATOL, rtol=0)  # the first chunk: before any step
    assert np.abs(lora - alone).max() > 1e-2


def test_lora_state_never_crosses_documents():
    """Swap two documents in the stream and batch them differently: every document's NLLs are unchanged."""
    hp = lora_hp(TTT_PHASES=0)
    a = lora_eval(make_docs(), hp)["nll"]
    i, j = 2, 5  # 90 and 13 targets: both move, and the batches change
    order = list(range(len(DOC_LENGTHS)))
    order[i], order[j] = j, i
    tokens = make_docs()
    pieces = [tokens[s:s + k] for s, k in zip(DOC_STARTS, DOC_LENGTHS)]
    swapped = np.concatenate([pieces[d] for d in order] + [tokens[-1:]])
    b = lora_eval(swapped, lora_hp(TTT_PHASES=0, TTT_LORA_BATCH_DOCS=2))["nll"]
    pos = np.cumsum([0] + [DOC_LENGTHS[d] for d in order])
    for k, d in enumerate(order[:-1]):  # the last document (no next BOS) stays in place
        np.testing.assert_allclose(b[pos[k]:pos[k + 1]], a[DOC_STARTS[d]:DOC_STARTS[d] + DOC_LENGTHS[d]],
                                   atol=ATOL, rtol=0, err_msg=f"document {d}")


def test_lora_phase_sgd_sees_only_scored_documents(monkeypatch):
    tokens = make_docs()
    scored, seen = np.zeros(len(tokens), bool), []
    real_add, real_step = t.Evaluator.add, t.ttt_step

    def add(self, tally, nll, tgt, keep=None):
        scored[tgt[keep if keep is not None else torch.ones_like(tgt, dtype=torch.bool)].numpy()] = True
        return real_add(self, tally, nll, tgt, keep)

    def step(ev, m, params, opt, group, clip):
        for s, e in group:
            assert scored[s + 1:e + 1].all(), f"SGD on targets {s + 1}..{e} before they were scored"
        seen.append((max(e for _, e in group), scored[1:].all()))
        return real_step(ev, m, params, opt, group, clip)

    monkeypatch.setattr(t.Evaluator, "add", add)
    monkeypatch.setattr(t, "ttt_step", step)
    lora_eval(tokens, lora_hp())
    ends = [e for e, _ in seen]
    assert {40, 137, 222} <= set(ends) and max(ends) == 222  # phases of documents [0], [1, 2], [3, 4]
    assert not any(done for _, done in seen)  # later documents were still unscored: the check is not vacuous


def test_lora_ttt_two_gloo_processes_match_one_and_are_causal(tmp_path):
    """Ranks split the documents and average the phases' SGD gradients: 2 gloo processes give 1 process's NLLs
    (to float reduction order), and stay causal, with 0 and 3 phases."""
    p = LORA_P[0]
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import os, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import numpy as np, torch, torch.distributed as dist
import train_gpt as t
import test_eval as te
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {{}}
for phases in (0, 3):
    for name, tokens in (("a", te.make_docs()), ("b", te.changed_after(te.make_docs(), {p}))):
        ev = t.Evaluator(tokens, te.SEQ, te.SEQ * 4, te.make_luts(), te.CPU, rank, world)
        r = t.evaluate_lora_ttt(ev, te.make_model(), te.lora_hp(TTT_PHASES=phases), dump=True, log=lambda *_: None)
        out[f"{{name}}{{phases}}"] = r["nll"]
if rank == 0:
    np.savez({str(tmp_path / 'nll.npz')!r}, **out)
dist.barrier()  # as train_gpt.main: a rank that tears gloo down while its peer finishes aborts (~1 run in 15)
dist.destroy_process_group()
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = run_train({**env, "OMP_NUM_THREADS": "1"}, sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", str(worker))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    two = np.load(tmp_path / "nll.npz")
    for phases in (0, 3):
        one = lora_eval(make_docs(), lora_hp(TTT_PHASES=phases))["nll"]
        tol = ATOL if phases == 0 else 1e-3  # the SGD's gradients summed in another order, over 3 phases of steps
        np.testing.assert_allclose(two[f"a{phases}"], one, atol=tol, rtol=0)
        assert_causal(two[f"a{phases}"], two[f"b{phases}"], p)
    assert np.abs(two["a3"] - two["a0"]).max() > 0.1  # the phases' SGD moved the scores: the match is not vacuous
