"""Tests for data/prepare.py: build, bad inputs, the embedded sample (download: test_download.py)."""
from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "data")):
    if p not in sys.path:
        sys.path.insert(0, p)

import prepare  # noqa: E402

VOCAB = 384
N_DOCS, N_VAL = 40, 8
SHARD_TOKENS = 5000  # small, so documents span shard boundaries


def tg():
    import train_gpt
    return train_gpt


def sample_texts(n: int) -> list[str]:
    out = []
    with lzma.open(prepare.SAMPLE_DOCS, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def write_jsonl(path: Path, texts) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


def read_split(ds_dir: Path, split: str) -> np.ndarray:
    names = sorted(p.name for p in ds_dir.glob(f"fineweb_{split}_*.bin"))
    if not names:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate([np.asarray(tg().load_shard(ds_dir / n)) for n in names])


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == prepare.BOS_ID)
    assert tokens.size == 0 or starts[0] == 0, "stream must start with BOS"
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, ends)]


def no_leftovers(parent: Path) -> bool:
    return not any(p.name.startswith(".") and ".tmp-" in p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build with a trained tokenizer; many small chunks so the worker pool's ordering is exercised."""
    root = tmp_path_factory.mktemp("build")
    texts = sample_texts(N_DOCS)
    docs = write_jsonl(root / "docs.jsonl", texts)
    out = root / "out"
    old = prepare._CHUNK_DOCS
    prepare._CHUNK_DOCS = 3
    try:
        ds = prepare.build(docs, out, vocab_size=VOCAB, val_docs=N_VAL, shard_tokens=SHARD_TOKENS, workers=2,
                           progress=False)
    finally:
        prepare._CHUNK_DOCS = old
    return root, docs, out, ds, texts


def test_build_layout_and_roundtrip(built):
    import sentencepiece as spm
    root, docs, out, ds, texts = built
    assert ds == out / "datasets" / f"fineweb10B_sp{VOCAB}"
    tok = out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert sp.get_piece_size() == VOCAB and sp.bos_id() == 1 and sp.eos_id() == 2
    assert len(tok.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()) == VOCAB
    val, train = read_split(ds, "val"), read_split(ds, "train")
    val_docs, train_docs = split_docs(val), split_docs(train)
    assert len(val_docs) == N_VAL and len(train_docs) == N_DOCS - N_VAL
    for ids, text in zip(val_docs + train_docs, texts):
        assert ids == sp.encode(text)
        assert sp.decode(ids) == sp.decode(sp.encode(text))
    # normalisation is real: at least one document does not survive byte-exact (newlines -> spaces)
    assert any(sp.decode(ids) != t for ids, t in zip(val_docs + train_docs, texts))
    # shards: full ones have exactly SHARD_TOKENS, documents cross shard boundaries
    names = sorted(p.name for p in ds.glob("fineweb_train_*.bin"))
    counts = [tg().read_shard_header(ds / n) for n in names]
    assert len(names) >= 3 and all(c == SHARD_TOKENS for c in counts[:-1]) and 0 < counts[-1] <= SHARD_TOKENS
    assert any(np.asarray(tg().load_shard(ds / n))[0] != prepare.BOS_ID for n in names[1:])


def test_build_manifest_counts(built):
    root, docs, out, ds, texts = built
    m = json.loads((ds / "manifest.json").read_text())
    assert m["vocab_size"] == VOCAB
    assert m["tokenizer"]["sha256"] == prepare.sha256_file(out / m["tokenizer"]["path"])
    for split, sl in (("val", slice(0, N_VAL)), ("train", slice(N_VAL, None))):
        info = m["splits"][split]
        assert info["documents"] == len(texts[sl])
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts[sl])
        assert info["tokens"] == read_split(ds, split).size == sum(info["shard_tokens"])
        assert [tg().read_shard_header(ds / n) for n in info["shards"]] == info["shard_tokens"]
        assert sorted(p.name for p in ds.glob(f"fineweb_{split}_*.bin")) == info["shards"]
    assert m["settings"]["val_docs"] == N_VAL and m["settings"]["shard_tokens"] == SHARD_TOKENS
    assert prepare.verify_dataset(ds)["splits"] == m["splits"]
    assert no_leftovers(root)


def test_train_val_disjoint(built):
    root, docs, out, ds, texts = built
    val = {tuple(d) for d in split_docs(read_split(ds, "val"))}
    train = {tuple(d) for d in split_docs(read_split(ds, "train"))}
    assert len(val) == N_VAL and not (val & train)


def test_tokenizer_reuse_identical_and_mismatch(built, tmp_path):
    root, docs, out, ds, texts = built
    tok = out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    out2 = tmp_path / "out2"
    ds2 = prepare.build(docs, out2, tokenizer=tok, vocab_size=VOCAB, val_docs=N_VAL, shard_tokens=SHARD_TOKENS,
                        workers=1, progress=False)
    a = sorted(p.name for p in ds.glob("*.bin"))
    assert a == sorted(p.name for p in ds2.glob("*.bin")) and len(a) >= 4
    for n in a:
        assert (ds / n).read_bytes() == (ds2 / n).read_bytes()
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (ds, ds2))
    assert m1["splits"] == m2["splits"] and m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    out3 = tmp_path / "out3"
    with pytest.raises(prepare.PrepareError, match=f"{VOCAB} pieces but --vocab-size is 512"):
        prepare.build(docs, out3, tokenizer=tok, vocab_size=512, val_docs=N_VAL, workers=1, progress=False)
    assert not out3.exists()
    # an existing dataset is not overwritten without force
    with pytest.raises(prepare.PrepareError, match="already exists"):
        prepare.build(docs, out2, tokenizer=tok, val_docs=N_VAL, workers=1, progress=False)


def test_val_docs_file_cap_and_zero(built, tmp_path):
    root, docs, out, ds, texts = built
    tok = out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    val_file = write_jsonl(tmp_path / "val.jsonl", texts[:3])
    train_file = write_jsonl(tmp_path / "train.jsonl", texts[3:9])
    ds_a = prepare.build(train_file, tmp_path / "a", tokenizer=tok, val_docs_file=val_file, workers=1, progress=False)
    m = json.loads((ds_a / "manifest.json").read_text())
    assert (m["splits"]["val"]["documents"], m["splits"]["train"]["documents"]) == (3, 6)
    assert len(split_docs(read_split(ds_a, "val"))) == 3 and len(split_docs(read_split(ds_a, "train"))) == 6
    # default-style large --val-docs is capped so train keeps one document
    ds_b = prepare.build(train_file, tmp_path / "b", tokenizer=tok, val_docs=1000, workers=1, progress=False)
    m = json.loads((ds_b / "manifest.json").read_text())
    assert (m["splits"]["val"]["documents"], m["splits"]["train"]["documents"]) == (5, 1)
    assert m["splits"]["train"]["bytes"] == len(texts[8].encode("utf-8"))
    assert m["splits"]["val"]["bytes"] == sum(len(t.encode("utf-8")) for t in texts[3:8])
    ds_c = prepare.build(train_file, tmp_path / "c", tokenizer=tok, val_docs=0, workers=1, progress=False)
    assert not list(ds_c.glob("fineweb_val_*.bin")) and len(split_docs(read_split(ds_c, "train"))) == 6


def bad_case(tmp_path, name):
    p = tmp_path / name
    good = json.dumps({"text": "A perfectly fine document."})
    if name == "empty.jsonl":
        p.write_bytes(b"")
    elif name == "badjson.jsonl":
        p.write_text(good + "\n" + good + "\n{\"text\": \"unterminated\n" + good + "\n", encoding="utf-8")
    elif name == "badutf8.jsonl":
        p.write_bytes(good.encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n')
    elif name == "notext.jsonl":
        p.write_text(good + "\n" + json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    elif name == "bigvocab.jsonl":
        write_jsonl(p, ["tiny corpus number %d with few words." % i for i in range(6)])
    return p


@pytest.mark.parametrize("name, vocab, pattern", [
    ("missing.jsonl", 320, r"missing\.jsonl: no such file"),
    ("empty.jsonl", 320, r"empty\.jsonl: no documents"),
    ("badjson.jsonl", 320, r"badjson\.jsonl:3: invalid JSON"),
    ("badutf8.jsonl", 320, r"badutf8\.jsonl:2: invalid UTF-8 \(byte 0xe9"),
    ("notext.jsonl", 320, r"notext\.jsonl:2: expected a JSON object"),
    ("bigvocab.jsonl", 8000, r"(only supports a \d+-piece vocabulary, fewer than --vocab-size 8000)"),
])
def test_bad_inputs(tmp_path, name, vocab, pattern):
    src = bad_case(tmp_path, name)
    out = tmp_path / "out"
    with pytest.raises(prepare.PrepareError, match=pattern) as ei:
        prepare.build(src, out, vocab_size=vocab, val_docs=1, workers=1, progress=False)
    assert "\n" not in str(ei.value)
    assert not out.exists() and no_leftovers(tmp_path)


def test_cli_error_exit_code(tmp_path, capsys):
    src = bad_case(tmp_path, "badjson.jsonl")
    rc = prepare.main(["build", "--docs", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "badjson.jsonl:3: invalid JSON" in err
    assert not (tmp_path / "out").exists()


def test_write_shard(tmp_path):
    toks = np.array([1, 5, 65535, 0, 7], dtype=np.int64)
    p = tmp_path / "s.bin"
    assert prepare.write_shard(p, toks) == 5
    raw = p.read_bytes()
    assert len(raw) == 1024 + 10
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert tg().read_shard_header(p) == 5 and np.asarray(tg().load_shard(p)).tolist() == toks.tolist()
    with pytest.raises(ValueError):
        prepare.write_shard(tmp_path / "bad.bin", [1, 65536])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.bin"]


# ----------------------------------------------------------------------------- embedded sample
def test_sample_files_are_sane():
    assert prepare.SAMPLE_DOCS.stat().st_size <= 1_500_000
    texts = [t for _, t in prepare.iter_documents(prepare.SAMPLE_DOCS)]
    assert len(texts) > prepare.SAMPLE_VAL_DOCS and 2_000_000 <= sum(len(t.encode()) for t in texts) <= 3_000_000
    assert prepare.sha256_file(prepare.SAMPLE_TOKENIZER)  # present
    assert (prepare.SAMPLE_DIR / "README.md").is_file()


def test_sample_cli_builds_and_is_idempotent(tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "sample", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = out / "datasets" / "fineweb10B_sp4096"
    assert (out / "tokenizers" / "fineweb_4096_bpe.model").read_bytes() == prepare.SAMPLE_TOKENIZER.read_bytes()
    val = sorted(ds.glob("fineweb_val_*.bin"))
    train = sorted(ds.glob("fineweb_train_*.bin"))
    assert len(val) >= 1 and len(train) >= 2
    n_val = sum(tg().read_shard_header(p) for p in val)
    n_train = sum(tg().read_shard_header(p) for p in train)
    assert n_val >= 100_000 and n_train > n_val
    m = json.loads((ds / "manifest.json").read_text())
    assert m["splits"]["val"]["tokens"] == n_val and m["splits"]["train"]["tokens"] == n_train
    assert m["splits"]["val"]["documents"] == prepare.SAMPLE_VAL_DOCS
    mtimes = {p.name: p.stat().st_mtime_ns for p in ds.iterdir()}
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r2.returncode == 0 and "already in place" in r2.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ds.iterdir()} == mtimes
    # a damaged output is rebuilt rather than trusted
    train[0].write_bytes(train[0].read_bytes()[:-2])
    ds2 = prepare.sample(out, workers=1, progress=False)
    assert tg().read_shard_header(ds2 / train[0].name) == m["splits"]["train"]["shard_tokens"][0]
