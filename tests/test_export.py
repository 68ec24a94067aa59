"""Export: pack/unpack bit-exactness, GPTQ vs round-to-nearest on the rate-controlled grid, Hessian
collection, the size predictor against Brotli, the rate search (finest grid when it fits, otherwise the
limit filled to [99.5%, 100%], at full size too), the last-bytes pruning, and whole-program runs: the sizes
in the log match the files on disk, EVAL_ONLY and EXPORT_ONLY reproduce the run's scores exactly.

Unit tests use tiny in-process models; subprocess runs (a few seconds each) share one base run.
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch

import train_gpt as t
from conftest import ROOT, check_summary, random_gpt, run_train, tiny_cfg, tiny_env

TRAIN = ROOT / "train_gpt.py"
CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers



make_model = random_gpt


def token_batches(n: int, b: int = 2, T: int = 48, seed: int = 5, vocab: int = 64) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, T + 1), generator=g, dtype=torch.int32) for _ in range(n)]


def fp16_bits(shape, g, nan=True) -> torch.Tensor:
    """Arbitrary fp16 bit patterns (inf, subnormals, -0 and, unless nan=False, NaN included)."""
    x = torch.randint(-32768, 32768, shape, generator=g, dtype=torch.int32).to(torch.int16).view(torch.float16)
    return x if nan else torch.where(torch.isnan(x), torch.zeros_like(x), x)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float16:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


def assert_entries_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for n in a:
        assert a[n]["kind"] == b[n]["kind"], n
        keys = ("data",) if a[n]["kind"] == "fp16" else ("q", "scale")
        assert set(b[n]) == {"kind", *keys}, n
        for k in keys:
            assert same_bits(a[n][k].cpu(), b[n][k]), f"{n}.{k}"


def check_rt(packed, loaded, cfg):
    """t.check_roundtrip, whether or not it takes the config (its signature is being reworked)."""
    if len(inspect.signature(t.check_roundtrip).parameters) >= 3:
        return t.check_roundtrip(packed, loaded, cfg)
    return t.check_roundtrip(packed, loaded)


def deq(q, s) -> torch.Tensor:
    return q.float() * s.float()[:, None]


def prune_all_pm1(entries: dict) -> dict:
    """Every int6 code equal to +-1 set to 0: the most selective pruning can do."""
    out = dict(entries)
    for n, e in entries.items():
        if e["kind"] == "int6":
            out[n] = dict(e, q=torch.where(e["q"].abs() == 1, torch.zeros_like(e["q"]), e["q"]))
    return out


def roundtrip(entries, cfg):
    return t.unpack_artifact(t.decompress(t.compress(t.pack_artifact(entries, cfg))))


def weighted_err(W, q, s, H) -> torch.Tensor:
    """Per-row Hessian-weighted error diag((W - What) H (W - What)^T)."""
    D = W.double() - deq(q, s).double()
    return ((D @ H.double()) * D).sum(1)


# ---------------------------------------------------------------- pack / unpack


def random_entries(seed: int = 0, nan: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)

    def codes(shape, qmax):
        return torch.randint(-qmax, qmax + 1, shape, generator=g, dtype=torch.int32).to(torch.int8)

    def coded(kind, shape):
        return dict(kind=kind, q=codes(shape, t.QMAX[kind]), scale=fp16_bits((shape[0],), g, nan))

    # kinds interleaved so the per-kind sections must be re-split correctly
    return {
        "a.int6_odd": coded("int6", (5, 3)),
        "b.fp16_vec": dict(kind="fp16", data=fp16_bits((7,), g, nan)),
        "c.int8_one_row": coded("int8", (1, 17)),
        "d.int6_one_row": coded("int6", (1, 1)),
        "e.fp16_scalar": dict(kind="fp16", data=fp16_bits((), g, nan)),
        "f.int8_odd": coded("int8", (13, 11)),
        "g.fp16_mat": dict(kind="fp16", data=fp16_bits((3, 5), g, nan)),
        "h.int6_col": coded("int6", (9, 1)),
        "i.fp16_one": dict(kind="fp16", data=fp16_bits((1,), g, nan)),
        "j.int6_big": coded("int6", (37, 29)),
        "k.int8_tall": coded("int8", (31, 2)),
    }


def test_pack_unpack_bit_exact_awkward_shapes():
    entries = random_entries()
    cfg = tiny_cfg(ve_layers=(0, 2), recur_layers=(), mlp_mult=2.5, logit_softcap=17.0)
    blob = t.pack_artifact(entries, cfg)
    assert blob[:4] == t.ARTIFACT_MAGIC
    cfg2, back = t.unpack_artifact(t.decompress(t.compress(blob)))
    assert cfg2 == cfg and isinstance(cfg2.ve_layers, tuple) and isinstance(cfg2.recur_layers, tuple)
    assert_entries_equal(entries, back)
    assert back["e.fp16_scalar"]["data"].shape == ()
    # the trainer's own check agrees (it compares values with torch.equal, so NaN payloads are left out)
    finite = random_entries(nan=False)
    check_rt(finite, roundtrip(finite, cfg)[1], cfg)
    # the raw format carries the codes uncompressed: exactly one byte per code plus 2 per fp16 value/scale
    n_codes = sum(e["q"].numel() for e in entries.values() if e["kind"] != "fp16")
    n_half = sum(e["data"].numel() if e["kind"] == "fp16" else e["scale"].numel() for e in entries.values())
    assert len(blob) > n_codes + 2 * n_half
    assert len(blob) - (n_codes + 2 * n_half) < 2000  # the rest is the small JSON header


def test_compress_multiple_chunks(monkeypatch):
    monkeypatch.setattr(t, "BROTLI_CHUNK", 300)
    entries = random_entries(1)
    blob = t.pack_artifact(entries, tiny_cfg())
    data = t.compress(blob, threads=2)
    header, _ = t.artifact_header(blob)  # the header is one chunk; each section is cut every 300 bytes
    assert int.from_bytes(data[:4], "little") == 1 + sum(-(-size // 300) for size in header["sections"]) > 2
    assert t.decompress(data) == blob
    assert_entries_equal(entries, t.unpack_artifact(t.decompress(data))[1])


def test_unpack_rejects_damage():
    blob = t.pack_artifact(random_entries(), tiny_cfg())
    with pytest.raises(ValueError):
        t.unpack_artifact(b"XXXX" + blob[4:])
    with pytest.raises(ValueError):
        t.unpack_artifact(blob + b"\0")


def test_check_roundtrip_catches_one_flipped_code_or_scale():
    entries = random_entries(nan=False)
    _, back = roundtrip(entries, tiny_cfg())
    check_rt(entries, back, tiny_cfg())
    for name, key in (("j.int6_big", "q"), ("f.int8_odd", "q"), ("a.int6_odd", "scale"), ("g.fp16_mat", "data")):
        _, bad = roundtrip(entries, tiny_cfg())
        flat = bad[name][key].view(-1)
        if key == "q":
            flat[7] = -flat[7] if flat[7] != 0 else 1
        else:
            flat.view(torch.int16)[1] ^= 1  # one bit of one fp16 value
        with pytest.raises(RuntimeError, match="artifact roundtrip"):
            check_rt(entries, bad, tiny_cfg())


@pytest.fixture(scope="module")
def quantized():
    """The tiny model on the finest grid (a budget it fits easily)."""
    model = make_model()
    hs = t.collect_hessians(model, token_batches(3), CPU, world=1)
    entries, knob, _ = t.RateSearch(model, hs, True, 0, 1).run(10 ** 9)
    assert knob == 0.0
    return model, hs, entries


def test_real_model_quantize_pack_load(quantized):
    model, hs, entries = quantized
    plan = t.quant_plan(model)
    assert list(entries) == list(plan)
    assert {e["kind"] for e in entries.values()} == {"int6", "int8", "fp16"}
    params = dict(model.named_parameters())
    for n, e in entries.items():
        assert e["kind"] == plan[n]
        if e["kind"] == "fp16":
            assert e["data"].dtype == torch.float16 and e["data"].shape == params[n].shape
            continue
        assert e["q"].dtype == torch.int8 and e["q"].shape == params[n].shape
        assert int(e["q"].abs().max()) <= t.QMAX[e["kind"]]
        # the finest grid: each row's step is its max / qmax, so the row's largest weight gets the largest code
        step = (params[n].abs().amax(1) / t.QMAX[e["kind"]]).half()
        assert torch.equal(e["scale"], step), n
        assert e["scale"].dtype == torch.float16 and e["scale"].shape == (params[n].shape[0],)
    cfg2, back = roundtrip(entries, model.cfg)
    assert cfg2 == model.cfg
    assert_entries_equal(entries, back)
    check_rt(entries, back, model.cfg)

    def load(ents):
        m = t.GPT(cfg2)
        m.load_state_dict(t.dequantize_entries(ents), strict=True)
        m.recur_active = True
        m.requires_grad_(False)
        return m

    ids = token_batches(1, b=2, T=40, seed=9)[0].long()[:, :-1]
    with torch.no_grad():
        z_mem, z_disk, z_orig = (m.logits(m.hidden(ids)) for m in (load(entries), load(back), model))
    assert torch.equal(z_mem, z_disk)
    # and the quantized model is close to the original (int6/int8 with a per-row scale)
    rel = (z_mem - z_orig).norm() / z_orig.norm()
    assert 0 < rel < 0.1, float(rel)


# ---------------------------------------------------------------- GPTQ on the rate-controlled grid


def correlated_hessian(cols: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, cols, generator=g, dtype=torch.float64)
    A = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    X = Z @ A  # random mixing: columns correlate
    return (X.T @ X / n).float()


def test_row_steps_finest_grid_or_floor():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 40, generator=g) * torch.tensor([0.001, 0.01, 0.05, 0.1, 0.5, 0.0])[:, None]
    fine = t.row_steps(t.finest_steps(W, 31), 0.0)
    assert torch.equal(fine, (W.abs().amax(1) / 31).clamp_min(1e-7).half())
    s = t.row_steps(t.finest_steps(W, 31), 0.004)
    assert torch.equal(s, torch.maximum(W.abs().amax(1) / 31, torch.tensor(0.004)).half())
    assert (s.float() >= fine.float()).all() and (s.float() > fine.float()).sum() == 3  # the floor binds on 3 rows
    q = t.rtn_quantize(W, s, 31)
    assert int(q.abs().max()) <= 31 and (q[5] == 0).all()
    assert ((W - deq(q, s)).abs() <= s.float()[:, None] / 2 + 1e-6).all()  # nothing clips: the step covers the row


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    cols = 160  # more than one 128-column block
    H = correlated_hessian(cols)
    d = H.diagonal()
    corr = H / (d[:, None] * d[None]).sqrt() - torch.eye(cols)
    assert corr.abs().mean() > 0.04  # really correlated (independent columns would give ~0.012 at n=4096)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, cols, generator=g) * 0.05
    for floor in (0.0, 0.02):  # the finest grid, and a coarse grid where the floor binds on every row
        s = t.row_steps(t.finest_steps(W, 31), floor)
        q_r, q_g = t.rtn_quantize(W, s, 31), t.gptq_quantize(W, H, s, 31)
        assert q_g.dtype == torch.int8 and int(q_g.abs().max()) <= 31
        e_r, e_g = weighted_err(W, q_r, s, H).sum(), weighted_err(W, q_g, s, H).sum()
        assert e_g < 0.9 * e_r, (floor, float(e_g), float(e_r))
    # lazy block updates are only a reordering of the same arithmetic
    q_b = t.gptq_quantize(W, H, s, 31, block=16)
    assert (q_b == q_g).float().mean() > 0.99
    assert weighted_err(W, q_b, s, H).sum() == pytest.approx(float(e_g), rel=0.02)


# ---------------------------------------------------------------- Hessians


def test_collect_hessians_matches_hand_computation():
    model = make_model(1)
    batches = token_batches(3, seed=11)
    plan = t.quant_plan(model)
    captured = {"blocks.0.mlp.fc": [], "blocks.1.attn.c_q": [], "ve_proj": []}  # block 1 runs twice (recurrence)
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: captured[n].append(a[0].reshape(-1, a[0].size(-1))
                                                                                      .double().clone()))
             for n in captured]
    hs = t.collect_hessians(model, batches, CPU, world=1)
    for h in hooks:
        h.remove()
    int6 = {n for n, k in plan.items() if k == "int6"}
    assert set(hs) == int6
    assert not (set(hs) & {n for n, k in plan.items() if k != "int6"})
    for blk in range(3):
        names = [f"blocks.{blk}.attn.c_{c}.weight" for c in "qkv"]
        assert torch.equal(hs[names[0]], hs[names[1]]) and torch.equal(hs[names[0]], hs[names[2]])  # same input
    assert len(captured["blocks.1.attn.c_q"]) == 2 * len(batches)  # the recurrent layer is seen per pass
    for name, xs in captured.items():
        X = torch.cat(xs)
        ref = X.T @ X / len(batches)
        H = hs[f"{name}.weight"]
        assert H.shape == (X.size(1), X.size(1))
        torch.testing.assert_close(H.double(), ref, rtol=1e-4, atol=1e-5)
    for H in {id(h): h for h in hs.values()}.values():
        torch.testing.assert_close(H, H.T, rtol=0, atol=1e-5)
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-4 * H.diagonal().max()
        assert H.diagonal().min() >= 0 and H.diagonal().max() > 0


def test_hessians_shared_by_qkv():
    """c_q/c_k/c_v read the same input: one Hessian object, accumulated once (not three copies)."""
    model = make_model(2)
    hs = t.collect_hessians(model, token_batches(1, seed=12), CPU, world=1)
    for blk in range(3):
        names = [f"blocks.{blk}.attn.c_{c}.weight" for c in "qkv"]
        assert hs[names[0]] is hs[names[1]] is hs[names[2]], f"block {blk}: c_q/c_k/c_v Hessians are separate tensors"
        assert hs[f"blocks.{blk}.attn.proj.weight"] is not hs[names[0]]
    assert len({id(h) for h in hs.values()}) == len(hs) - 2 * 3


# ---------------------------------------------------------------- the size predictor and the rate search


def test_huffman_bits_is_an_optimal_prefix_code():
    assert t.huffman_bits([]) == 0 and t.huffman_bits([0, 7, 0]) == 0  # one symbol: no bits (Brotli likewise)
    assert t.huffman_bits([3, 3]) == 6
    assert t.huffman_bits([1, 1, 2]) == 1 * 2 + 1 * 2 + 2 * 1  # lengths 2, 2, 1
    assert t.huffman_bits([1, 1, 1, 1]) == 8
    assert t.huffman_bits([5, 9, 12, 13, 16, 45]) == 224  # the textbook example (CLRS): 224 bits
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # never below the entropy, less than one bit above it per symbol
        c = torch.randint(0, 50, (12,), generator=g).tolist()
        n = sum(c)
        p = torch.tensor([x / n for x in c if x])
        h = float(-(p * p.log2()).sum()) * n
        assert h - 1e-6 <= t.huffman_bits(c) < h + n or len(p) == 1


@pytest.mark.parametrize("spread", [0.3, 1.0, 6.0])
def test_predicted_code_bytes_tracks_brotli(spread):
    """i.i.d. rounded Gaussians: sparse (mostly zeros: Brotli copies zero runs), ~2 bits and ~5 bits per code."""
    import brotli
    g = torch.Generator().manual_seed(1)
    q = torch.clamp(torch.round(torch.randn(512, 512, generator=g) * spread), -31, 31).to(torch.int8)
    real = len(brotli.compress(q.numpy().tobytes(), quality=11, lgwin=24))
    assert t.predicted_code_bytes(q) == pytest.approx(real, rel=0.03 if spread < 0.5 else 0.005)


def test_compress_cuts_an_artifact_at_its_sections():
    entries = random_entries(nan=False)
    blob = t.pack_artifact(entries, tiny_cfg())
    data = t.compress(blob)
    n = int.from_bytes(data[:4], "little")
    assert n == 1 + 4  # the header, then one chunk per non-empty section (int6, int8, scale, fp16)
    assert t.decompress(data) == blob
    assert t.decompress(t.compress(b"x" * 10)) == b"x" * 10


def rate_search(model, hs, gptq=True):
    return t.RateSearch(model, hs, gptq, 0, 1)


def test_rate_search_keeps_the_finest_grid_when_it_fits_and_fills_the_budget_otherwise(quantized):
    model, hs, fine_entries = quantized
    fine, _, _ = rate_search(model, hs).predict(0.0, True)
    entries, knob, predicted = rate_search(model, hs).run(int(fine * 1.02))
    assert knob == 0.0 and predicted == pytest.approx(fine, rel=0.01)
    check_rt(entries, fine_entries, model.cfg)  # the same codes and scales as the finest grid
    knobs = []
    for frac in (0.9, 0.7, 0.5):
        budget = int(fine * frac)
        s = rate_search(model, hs)
        entries, knob, predicted = s.run(budget)
        knobs.append(knob)
        assert t.FIT_BAND[0] * budget <= predicted <= t.FIT_BAND[1] * budget, (frac, predicted, budget)
        assert s.passes >= 1
        for n, e in entries.items():  # every step is the finest grid or the knob's floor, whichever is coarser
            if e["kind"] != "fp16":
                w = dict(model.named_parameters())[n]
                assert torch.equal(e["scale"], t.row_steps(t.finest_steps(w, t.QMAX[e["kind"]]), knob)), n
    assert knobs == sorted(knobs) and knobs[0] > 0  # less room, coarser grid
    with pytest.raises(t.FitError, match="all-zero"):
        rate_search(model, hs).run(200)


def test_rate_search_is_the_same_with_gptq_off_in_every_pass(quantized):
    model, hs, _ = quantized
    fine, _, _ = rate_search(model, hs, gptq=False).predict(0.0, False)
    s = rate_search(model, hs, gptq=False)
    entries, knob, predicted = s.run(int(fine * 0.7))
    assert s.passes == 1 and knob > 0
    steps = s.steps(knob)
    for n, e in entries.items():
        if e["kind"] != "fp16":
            assert torch.equal(e["q"], t.rtn_quantize(dict(model.named_parameters())[n], steps[n], t.QMAX[e["kind"]]))


@pytest.mark.parametrize("bias", [0.96, 1.04])
def test_export_model_corrects_a_biased_predictor_by_measuring(quantized, monkeypatch, bias):
    """A predictor 4% off either way: the real compression shows the miss, the search runs again and the total
    lands in [99.5%, 100%] of the limit, with the size the log reports."""
    model, hs, _ = quantized
    fine, _, _ = rate_search(model, hs).predict(0.0, True)
    code, limit = 3000, 3000 + int(fine * 0.7)
    real_predictor = t.predicted_code_bytes
    monkeypatch.setattr(t, "predicted_code_bytes", lambda q, rows=None: bias * real_predictor(q, rows))
    logs = []
    entries, blob, knob, predicted, _, _ = t.export_model(rate_search(model, hs), model.cfg, code, limit, CPU,
                                                          logs.append)
    assert logs and all(l.startswith("quant:verify: ") for l in logs)
    assert 0.995 * limit <= code + len(blob) <= limit, (code + len(blob), limit, logs)
    assert t.decompress(blob) == t.pack_artifact(entries, model.cfg) and knob > 0


def full_size_model(dist: str, sd: float) -> t.GPT:
    """The default 11x512 architecture with every 2-D weight drawn i.i.d. (trained-like synthetic weights)."""
    with torch.device("meta"):
        m = t.GPT(t.ModelConfig())
    m = m.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim < 2:
                p.normal_(1.0, 0.1)
            elif dist == "gauss":
                p.normal_(0.0, sd)
            else:
                p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * sd)
    m.requires_grad_(False)
    return m


@pytest.mark.parametrize("dist,sd", [("gauss", 0.02), ("gauss", 0.1), ("student_t4", 0.02), ("student_t4", 0.1)])
def test_full_size_export_fills_the_limit(dist, sd):
    """The default architecture (34.4 M parameters) under 16,000,000 bytes fills [99.5%, 100%] of the limit; with
    24,000,000 bytes the finest grid fits and is kept. Round-to-nearest passes (GPTQ at this size is GPU work).
    One case per distribution is verified by the real compression (~40 s each on 2 cores); the other two by the
    predictor, whose error the real cases bound."""
    m = full_size_model(dist, sd)
    code = TRAIN.stat().st_size
    _, knob24, _ = t.RateSearch(m, {}, False, 0, 1).run(24_000_000 - code)
    assert knob24 == 0.0
    search = t.RateSearch(m, {}, False, 0, 1)
    if (dist, sd) not in (("gauss", 0.02), ("student_t4", 0.1)):
        _, knob, predicted = search.run(16_000_000 - code)
        assert knob > 0 and 0.995 * 16_000_000 <= code + predicted <= 0.999 * 16_000_000
        return
    logs = []
    entries, blob, knob, predicted, _, _ = t.export_model(search, m.cfg, code, 16_000_000, CPU, logs.append)
    total = code + len(blob)
    assert 0.995 * 16_000_000 <= total <= 16_000_000, (total, logs)
    assert knob > 0 and not logs  # the prediction was right the first time: no second search
    assert len(blob) == pytest.approx(predicted, rel=0.002)
    assert t.decompress(blob) == t.pack_artifact(entries, m.cfg)  # the blob is these entries


# ---------------------------------------------------------------- fitting under the limit (unit)


def test_prune_to_fit_prunes_the_last_bytes_and_fails_when_impossible(quantized):
    model, hs, entries = quantized
    cfg, code = model.cfg, 5000
    orig = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()} for n, e in entries.items()}
    full = len(t.compress(t.pack_artifact(entries, cfg)))
    n_cands = sum(int((e["q"].abs() == 1).sum()) for e in entries.values() if e["kind"] == "int6")
    assert n_cands > 100
    floor = len(t.compress(t.pack_artifact(prune_all_pm1(entries), cfg)))
    assert floor < full - 20

    data_full = t.compress(t.pack_artifact(entries, cfg))
    prune = lambda limit, log: t.prune_to_fit(entries, data_full, cfg, hs, code, limit, log)

    # fits already: nothing pruned, nothing logged
    logs = []
    got, data = prune(code + full, logs.append)
    assert got is entries and data is data_full and not logs

    # a limit between "all +-1 pruned" and "nothing pruned"
    limit = code + (full + floor) // 2
    got, data = prune(limit, logs.append)
    assert code + len(data) <= limit
    assert any(l.startswith("selective_prune:") for l in logs)
    cfg2, back = t.unpack_artifact(t.decompress(data))
    assert cfg2 == cfg
    check_rt(got, back, cfg)  # the returned entries are exactly what was packed
    zeroed = 0
    for n, e in entries.items():
        assert torch.equal(e.get("q", e.get("data")), orig[n].get("q", orig[n].get("data"))), "input mutated"
        if e["kind"] != "int6":
            assert_entries_equal({n: e}, {n: got[n]})
            continue
        diff = got[n]["q"] != e["q"]
        assert (got[n]["q"][diff] == 0).all() and (e["q"][diff].abs() == 1).all()
        assert torch.equal(got[n]["scale"], e["scale"])
        zeroed += int(diff.sum())
    assert 0 < zeroed <= n_cands
    m = re.search(r"zeroed (\d+) codes", logs[-1])  # the log's count, where it gives one, is the real one
    assert m is None or int(m.group(1)) == zeroed

    # other limits in the feasible range, down to exactly "every +-1 code pruned", all fit
    for limit in (code + full - 1, code + floor + (full - floor) // 10, code + floor):
        got, data = prune(limit, lambda _: None)
        assert code + len(data) <= limit, (limit, code + len(data))
        assert data == t.compress(t.pack_artifact(got, cfg))

    # pruning every +-1 code cannot reach the limit
    with pytest.raises(t.FitError, match="ARTIFACT_BYTES_LIMIT"):
        prune(code + floor - 1, lambda _: None)


# ---------------------------------------------------------------- whole program


SIZE_LINES = {
    "serialized": re.compile(r"^Serialized model: (\d+) bytes$", re.M),
    "code": re.compile(r"^Code size: (\d+) bytes$", re.M),
    "model": re.compile(r"^Serialized model int6\+brotli: (\d+) bytes$", re.M),
    "total": re.compile(r"^Total submission size int6\+brotli: (\d+) bytes$", re.M),
}
SCORE = r"^{} val_loss:(\S+) val_bpb:(\S+) eval_time:\d+ms$"


def sizes(text: str) -> dict:
    out = {}
    for k, rx in SIZE_LINES.items():
        m = rx.findall(text)
        if m:
            assert len(m) == 1, f"{k} logged {len(m)} times"
            out[k] = int(m[0])
    return out


def scores(text: str, name: str) -> tuple:
    m = re.findall(SCORE.format(re.escape(name)), text, re.M)
    assert len(m) == 1, f"{name}: {m}"
    return m[0]


def run_ok(env, what):
    r = run_train(env)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def base_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_base")
    # the techniques beyond the reference on: the artifact carries them, and EVAL_ONLY / EXPORT_ONLY reproduce the
    # run with them
    env = tiny_env(tiny_data_dir, out, RUN_ID="base", MUON_NS="polar", RECUR_PASSES=3, SMEAR_GATE=1,
                   ATTN_OUT_GATE="dense")
    code_before = TRAIN.stat().st_size
    r = run_ok(env, "base run")
    return dict(out=out, env=env, stdout=r.stdout, log=(out / "logs" / "base.txt").read_text(), code=code_before)


def test_end_to_end_sizes_and_log(base_run):
    out, log = base_run["out"], base_run["log"]
    for line in log.splitlines():  # rank 0 logs every line to stdout and to the file
        assert line in base_run["stdout"], line
    s = sizes(log)
    assert set(s) == set(SIZE_LINES), s
    assert s["code"] == base_run["code"] == TRAIN.stat().st_size
    art = out / "final_model.int6.ptz"
    assert s["model"] == art.stat().st_size
    assert s["total"] == art.stat().st_size + s["code"]
    assert s["serialized"] == (out / "final_model.pt").stat().st_size
    assert s["model"] < s["serialized"]
    loss, bpb = map(float, scores(log, "final_int6_roundtrip"))
    assert 3.0 < loss < 6.5 and 1.0 < bpb < 6.0
    scores(log, "final_int6_sliding_window")
    # the artifact on disk is what the run evaluated: a loadable model with the run's config
    cfg, entries = t.load_artifact(art)
    assert (cfg.num_layers, cfg.model_dim, cfg.vocab_size, cfg.recur_layers, cfg.ve_layers) == (4, 32, 512, (1, 2),
                                                                                                (2, 3))
    assert (cfg.recur_passes, cfg.smear_gate, cfg.attn_out_gate) == (3, True, "dense")
    assert {e["kind"] for n, e in entries.items() if "gate" in n and "skip" not in n or "smear" in n} == {"fp16"}
    m = t.GPT(cfg)
    m.load_state_dict(t.dequantize_entries(entries), strict=True)
    assert not list(out.glob("*.tmp*"))


def test_eval_only_reproduces_run(base_run, tiny_data_dir, tmp_path):
    art = base_run["out"] / "final_model.int6.ptz"
    # architecture env vars differ on purpose: EVAL_ONLY must take the model config from the artifact, and with
    # no sequence length given it evaluates at the run's (64 here, not the 2048 default)
    env = tiny_env(tiny_data_dir, tmp_path / "eo", RUN_ID="eo", EVAL_ONLY=str(art), MODEL_DIM="48", SEED="7")
    del env["TRAIN_SEQ_LEN"], env["TRAIN_BATCH_TOKENS"]
    r = run_ok(env, "EVAL_ONLY run")
    for name in ("final_int6_roundtrip", "final_int6_sliding_window"):
        assert scores(r.stdout, name) == scores(base_run["log"], name), name
    s, s0 = sizes(r.stdout), sizes(base_run["log"])
    assert s["model"] == s0["model"] and s["total"] == s0["total"]
    assert not (tmp_path / "eo" / "final_model.int6.ptz").exists()
    assert "train_loss" not in r.stdout and "  eval_seq_len: 64" in r.stdout
    summary = check_summary(r.stdout, mode="eval_only")
    assert summary["steps"] is None and summary["train_ms"] is None and summary["pre_quant"] is None


def test_export_only_reproduces_the_run(base_run, tiny_data_dir, tmp_path):
    """EXPORT_ONLY on the run's own final_model.pt, with the run's settings: the same artifact, byte for byte,
    and the same final_int6_* lines; no training, and the checkpoint is not rewritten."""
    ckpt = base_run["out"] / "final_model.pt"
    out = tmp_path / "xo"
    r = run_ok({**base_run["env"], "OUT_DIR": str(out), "RUN_ID": "xo", "EXPORT_ONLY": str(ckpt)}, "EXPORT_ONLY run")
    assert (out / "final_model.int6.ptz").read_bytes() == (base_run["out"] / "final_model.int6.ptz").read_bytes()
    for name in ("final_int6_roundtrip", "final_int6_sliding_window"):
        assert scores(r.stdout, name) == scores(base_run["log"], name), name
    assert "train_loss" not in r.stdout and "export_only: " + str(ckpt) in r.stdout
    assert not (out / "final_model.pt").exists() and "Serialized model:" not in r.stdout
    summary = check_summary(r.stdout, mode="export_only")
    assert summary["steps"] is None and summary["train_ms"] == 0 and summary["pre_quant"] is not None


def test_export_only_refuses_a_checkpoint_of_another_architecture(base_run, tmp_path):
    ckpt = tmp_path / "final_model.pt"  # no final_model.json beside it: the shape comes from the env
    ckpt.write_bytes((base_run["out"] / "final_model.pt").read_bytes())
    out = tmp_path / "refused"
    r = run_train({**base_run["env"], "OUT_DIR": str(out), "EXPORT_ONLY": str(ckpt), "MODEL_DIM": "48"})
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: EXPORT_ONLY=") and "does not match" in err[0], err
    assert not out.exists()
    # with the env's architecture equal to the run's, the same file is accepted (the shapes, not the json, decide)
    (tmp_path / "final_model.json").write_text('{"config": {"num_layers": 3}}')
    r = run_train({**base_run["env"], "OUT_DIR": str(out), "EXPORT_ONLY": str(ckpt)})
    assert r.returncode == 2 and "final_model.json" in r.stderr and not out.exists()


def test_tight_limit_fits_by_the_rate_search(base_run, tmp_path):
    """2% under the finest grid's size: the knob coarsens the grid and the total lands just under the limit."""
    s0 = sizes(base_run["log"])
    limit = int(s0["total"] * 0.98)
    out = tmp_path / "tight"
    env = {**base_run["env"], "OUT_DIR": str(out), "RUN_ID": "tight", "ARTIFACT_BYTES_LIMIT": str(limit),
           "EXPORT_ONLY": str(base_run["out"] / "final_model.pt")}
    log = run_ok(env, "tight-limit run").stdout
    assert "quant:grid knob: 0 " in base_run["log"]  # the run itself had room for the finest grid
    knob = float(re.search(r"^quant:grid knob: (\S+)", log, re.M).group(1))
    assert knob > 0
    s = sizes(log)
    assert s["total"] == (out / "final_model.int6.ptz").stat().st_size + s["code"]
    assert 0.99 * limit <= s["total"] <= limit, (s["total"], limit)
    r0, r1 = float(scores(base_run["log"], "final_int6_roundtrip")[1]), float(scores(log, "final_int6_roundtrip")[1])
    assert r1 >= r0 - 1e-4  # a coarser grid, no better a score


def test_impossible_limit_fails_and_writes_no_artifact(tiny_data_dir, tmp_path):
    code = TRAIN.stat().st_size
    for limit in (1000, code + 300):  # code alone over it (pre-flight); all-zero codes still over it (the search)
        out = tmp_path / f"impossible{limit}"
        r = run_train(tiny_env(tiny_data_dir, out, RUN_ID="imp", ARTIFACT_BYTES_LIMIT=limit))
        assert r.returncode != 0
        err = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("error:")]
        assert err and f"ARTIFACT_BYTES_LIMIT={limit}" in err[0], (r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert not (out / "final_model.int6.ptz").exists()
        assert not list(out.glob("*.tmp*"))
        assert "final_int6_roundtrip" not in r.stdout
