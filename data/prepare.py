#!/usr/bin/env python3
"""Data tool for train_gpt.py: fetch, build or sample token shards in the challenge format.

Subcommands (``python data/prepare.py SUBCOMMAND --help`` for options):

``download``  fetch the published FineWeb shards and tokenizer from the Hugging Face hub, as upstream's
              ``data/cached_challenge_fineweb.py`` does, with its flags and env vars (``--variant sp4096``
              from ``kevclark/parameter-golf``, ``sp1024`` from ``willdepueoai/parameter-golf``). All val
              shards and the first ``--train-shards`` train shards; counts and tokenizer files come from the
              repo's ``datasets/manifest.json``. Every file is verified before it is put in place; a file
              already in place that verifies is not fetched again, so a rerun continues where one stopped.
``build``     tokenize a JSONL corpus (one ``{"text": ...}`` per line, optionally ``.xz``) into shards,
              training a SentencePiece BPE tokenizer with the challenge settings unless ``--tokenizer``
              is given.
``sample``    build the small embedded sample (``data/sample/``) with its tokenizer; used by the smoke
              run as ``python data/prepare.py sample --out data/smoke``. A no-op when the output
              already exists and verifies.

Layout written under DATA_DIR (same as upstream)::

    DATA_DIR/datasets/fineweb10B_sp{V}/fineweb_val_000000.bin ...   (val shards first)
    DATA_DIR/datasets/fineweb10B_sp{V}/fineweb_train_000000.bin ...
    DATA_DIR/datasets/fineweb10B_sp{V}/manifest.json                 (build/sample only)
    DATA_DIR/tokenizers/fineweb_{V}_bpe.model  (+ .vocab)
    DATA_DIR/manifest.json                                           (download: the hub's manifest)

Shard format: 256 little-endian int32 header (magic 20240520, version 1, token count N, rest 0) then N
little-endian uint16 tokens. Each document is ``[BOS=1] + sp.encode(text)``, no EOS; documents are
concatenated and may span shards; a shard is flushed every ``--shard-tokens`` tokens.

Decisions that differ from or go beyond upstream (``download_hf_docs_and_tokenize.py``):

* Validation split: the first ``--val-docs`` documents (default 50,000), capped at ``n_docs - 1`` so that
  training always keeps at least one document (a note is printed when the cap applies). ``--val-docs 0``
  writes no val shard. ``--val-docs-file`` takes val from a separate file and sends every ``--docs``
  document to train.
* The tokenizer is trained on the *training* split only (the first ``--tokenizer-train-docs`` train
  documents, default 5,000,000), so no validation text is seen by the tokenizer. Upstream trains on the
  first 5M documents of its file, which include its val documents. ``max_sentence_length`` is 1 MiB (as
  in the shared proxy tokenizer) so that long documents are not dropped from tokenizer training.
* Blank lines in the JSONL are skipped; every other line must be a JSON object with a string "text".
* ``build`` is atomic: everything is written into a temporary folder beside ``--out`` and renamed into
  place at the end, so a failure leaves nothing behind.

Errors in the input are reported as ``PrepareError`` (one line; the CLI prints it and exits with 2).
Importing this module has no side effects. Shards are verified with ``train_gpt.read_shard_header``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

DATA_ROOT = Path(__file__).resolve().parent
REPO_ROOT = DATA_ROOT.parent
SAMPLE_DIR = DATA_ROOT / "sample"
SAMPLE_DOCS = SAMPLE_DIR / "docs.jsonl.xz"
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer.model"
SAMPLE_VOCAB_SIZE = 4096
SAMPLE_VAL_DOCS = 100           # 109,045 val tokens (incl. BOS) with the sample tokenizer
SAMPLE_SHARD_TOKENS = 200_000   # several train shards, so the smoke run exercises multi-shard loading

BOS_ID = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_DOCS = 50_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 5_000_000
DEFAULT_TRAIN_SHARDS = 80
MAX_VOCAB = 1 << 16             # tokens are stored as uint16

# Published data (upstream's data/cached_challenge_fineweb.py): hub dataset repos, and the folder in them that
# holds manifest.json, datasets/ and tokenizers/. The env vars are upstream's, with upstream's meaning.
UPSTREAM_REPO = "willdepueoai/parameter-golf"          # upstream's default, for every variant
VARIANT_REPOS = {"sp4096": "kevclark/parameter-golf"}  # published elsewhere: the default for that variant here
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REMOTE_ROOT = "datasets"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")  # --with-docs

# Challenge tokenizer settings (reference spec section 1.2).
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    hard_vocab_limit=False,
    max_sentence_length=1 << 20,
)

_CHUNK_BYTES = 1 << 20          # text per worker task
_CHUNK_DOCS = 512


class PrepareError(Exception):
    """Bad input or a failed check; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- helpers
def _train_gpt():
    """Import train_gpt (repo root) lazily: it owns the shard format constants and reader."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    import train_gpt
    return train_gpt


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_paths(data_dir, vocab_size: int) -> tuple[Path, Path]:
    """(dataset folder, tokenizer .model path) in the upstream layout under data_dir."""
    data_dir = Path(data_dir)
    return (data_dir / "datasets" / f"fineweb10B_sp{vocab_size}",
            data_dir / "tokenizers" / f"fineweb_{vocab_size}_bpe.model")


def write_shard(path, tokens) -> int:
    """Write one shard atomically (train_gpt.write_atomic); return its token count."""
    tg = _train_gpt()
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {toks.shape}")
    if toks.size and (not np.issubdtype(toks.dtype, np.integer) or toks.min() < 0 or toks.max() >= MAX_VOCAB):
        raise ValueError(f"{path}: tokens must be integers in [0, {MAX_VOCAB})")
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = tg.SHARD_MAGIC, tg.SHARD_VERSION, toks.size
    tg.write_atomic(Path(path), header.tobytes() + toks.astype("<u2", copy=False).tobytes())
    return int(toks.size)


def _open_lines(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def iter_documents(path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each document of a JSONL(.xz) file; raise PrepareError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: no such file")
    try:
        with _open_lines(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise PrepareError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
                text = obj["text"]
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise PrepareError(f"{path}:{lineno}: text contains an unpaired surrogate escape (not valid Unicode)") from None
                yield lineno, text
    except (lzma.LZMAError, EOFError) as e:
        raise PrepareError(f"{path}: corrupt or truncated .xz file ({e})") from None
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror or e})") from None


def _tokenizer_text(text: str) -> str:
    return text.replace("\x00", " ").strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_prefix, num_threads: int = 1) -> Path:
    """Train a SentencePiece BPE with the challenge settings; write model_prefix.model/.vocab.

    Raises PrepareError when the data cannot support vocab_size pieces (SentencePiece either raises or,
    with hard_vocab_limit=False, silently returns a smaller vocabulary; both are reported).
    """
    import sentencepiece as spm
    texts = [t for t in (_tokenizer_text(x) for x in texts) if t]
    if not texts:
        raise PrepareError("no non-empty training text to train the tokenizer on")
    model_prefix = str(model_prefix)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=model_prefix,
                                       vocab_size=vocab_size, num_threads=max(1, num_threads),
                                       minloglevel=2, **TOKENIZER_SETTINGS)
    except (RuntimeError, OSError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        detail = re.sub(r"^.*?\] ", "", detail)
        raise PrepareError(f"SentencePiece cannot train a {vocab_size}-piece tokenizer on this data: {detail}") from None
    model = Path(model_prefix + ".model")
    got = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    if got != vocab_size:
        raise PrepareError(f"the data only supports a {got}-piece vocabulary, fewer than --vocab-size {vocab_size}; "
                           f"use more documents or a smaller vocabulary")
    return model


def _check_tokenizer(path: Path, vocab_size: int | None):
    import sentencepiece as spm
    if not path.is_file():
        raise PrepareError(f"{path}: no such tokenizer file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise PrepareError(f"{path}: not a SentencePiece model ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") from None
    n = sp.get_piece_size()
    if vocab_size is not None and n != vocab_size:
        raise PrepareError(f"{path}: tokenizer has {n} pieces but --vocab-size is {vocab_size}")
    if sp.bos_id() != BOS_ID:
        raise PrepareError(f"{path}: tokenizer bos_id is {sp.bos_id()}, shards need {BOS_ID}")
    if n > MAX_VOCAB:
        raise PrepareError(f"{path}: {n} pieces do not fit in uint16 tokens")
    return sp


def _write_vocab(sp, path: Path) -> None:
    """Write a .vocab file (piece<TAB>score per line) like SentencePiece's trainer does."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")


# ----------------------------------------------------------------------------- tokenization workers
_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm
    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_chunk(texts: Sequence[str]) -> np.ndarray:
    out: list[int] = []
    for ids in _SP.encode(list(texts)):
        out.append(BOS_ID)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.cap = folder, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.names: list[str] = []
        self.counts: list[int] = []

    def add(self, toks: np.ndarray) -> None:
        pos = 0
        while pos < toks.size:
            take = min(self.cap - self.fill, toks.size - pos)
            self.buf[self.fill:self.fill + take] = toks[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self._flush()

    def _flush(self) -> None:
        name = f"fineweb_{self.split}_{len(self.names):06d}.bin"
        self.counts.append(write_shard(self.folder / name, self.buf[:self.fill]))
        self.names.append(name)
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            self._flush()


def _chunks(split_docs: Iterable[tuple[str, Iterator[str]]]):
    for split, texts in split_docs:
        chunk, size = [], 0
        for text in texts:
            chunk.append(text)
            size += len(text)
            if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_DOCS:
                yield split, chunk
                chunk, size = [], 0
        if chunk:
            yield split, chunk


def _encode_ordered(chunks, model_path: str, workers: int):
    """Yield (split, n_docs, tokens) for each chunk, in input order, using `workers` processes."""
    if workers <= 1:
        _init_worker(model_path)
        for split, chunk in chunks:
            yield split, len(chunk), _encode_chunk(chunk)
        return
    import multiprocessing as mp
    ctx = mp.get_context("spawn")   # no fork of a parent that may hold torch/threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending: deque = deque()
        for split, chunk in chunks:
            pending.append((split, len(chunk), pool.apply_async(_encode_chunk, (chunk,))))
            while len(pending) > 2 * workers:     # bounded memory, order preserved
                s, n, res = pending.popleft()
                yield s, n, res.get()
        while pending:
            s, n, res = pending.popleft()
            yield s, n, res.get()


# ----------------------------------------------------------------------------- atomic output
def _stage_dir(out: Path) -> Path:
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=anc))
    stage.chmod(0o755)  # mkdtemp makes it owner-only; it becomes the output folder
    return stage


def _commit(stage: Path, out: Path, rels: list[str], force: bool) -> None:
    """Move stage/rel -> out/rel for each rel (or the whole stage when out does not exist)."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage, out)
        return
    for rel in rels:  # check every conflict before moving anything
        dst, src = out / rel, stage / rel
        if dst.exists() and not force:
            if dst.is_file() and src.is_file() and sha256_file(dst) == sha256_file(src):
                continue
            raise PrepareError(f"{dst} already exists (pass --force to replace it)")
    trash = stage / ".replaced"
    for rel in rels:
        dst, src = out / rel, stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir():
            trash.mkdir(exist_ok=True)
            os.rename(dst, trash / dst.name)
        os.replace(src, dst)
    shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- build
def build(docs, out, *, vocab_size: int | None = None, tokenizer=None, val_docs: int | None = None,
          val_docs_file=None, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
          tokenizer_train_docs: int = DEFAULT_TOKENIZER_TRAIN_DOCS, force: bool = False,
          progress: bool = True, command: list[str] | None = None) -> Path:
    """Tokenize a JSONL(.xz) corpus into shards under `out` (upstream layout); return the dataset folder.

    vocab_size defaults to 4096 when training, or to the tokenizer's size when `tokenizer` is given (an
    explicit value must then match). Raises PrepareError on bad input; nothing is left under `out`.
    """
    t0 = time.time()
    docs, out = Path(docs), Path(out)
    val_file = Path(val_docs_file) if val_docs_file is not None else None
    if val_file is not None and val_docs is not None:
        raise PrepareError("give either --val-docs or --val-docs-file, not both")
    want_val = DEFAULT_VAL_DOCS if val_docs is None else int(val_docs)
    if want_val < 0:
        raise PrepareError("--val-docs must be >= 0")
    if shard_tokens < 1:
        raise PrepareError("--shard-tokens must be >= 1")
    if tokenizer_train_docs < 1:
        raise PrepareError("--tokenizer-train-docs must be >= 1")
    workers = max(1, int(workers or os.cpu_count() or 1))
    if tokenizer is not None:
        tok_src = Path(tokenizer)
        sp = _check_tokenizer(tok_src, vocab_size)
        vocab_size = sp.get_piece_size()
    else:
        vocab_size = 4096 if vocab_size is None else int(vocab_size)
        if not 260 <= vocab_size <= MAX_VOCAB:  # 4 special + 256 byte-fallback pieces at least
            raise PrepareError(f"--vocab-size must be in [260, {MAX_VOCAB}] (got {vocab_size})")
    ds_dir, tok_path = dataset_paths(out, vocab_size)
    ds_rel, tok_rel = ds_dir.relative_to(out), tok_path.relative_to(out)
    if ds_dir.exists() and not force:
        raise PrepareError(f"{ds_dir} already exists (pass --force to replace it)")

    # Pass 1: validate every line, count documents and bytes, collect tokenizer training text.
    collect = tokenizer is None
    tok_texts: list[str] = []
    last_text = None
    stats = {"val": {"documents": 0, "bytes": 0}, "train": {"documents": 0, "bytes": 0}}
    if val_file is not None:
        for _, text in iter_documents(val_file):
            stats["val"]["documents"] += 1
            stats["val"]["bytes"] += len(text.encode("utf-8"))
        if stats["val"]["documents"] == 0:
            raise PrepareError(f"{val_file}: no documents")
        n_val = stats["val"]["documents"]
    n_docs, doc_bytes = 0, []
    for _, text in iter_documents(docs):
        b = len(text.encode("utf-8"))
        if val_file is None and n_docs < want_val:
            doc_bytes.append(b)
        else:
            stats["train"]["documents"] += 1
            stats["train"]["bytes"] += b
            if collect and len(tok_texts) < tokenizer_train_docs:
                tok_texts.append(text)
        last_text = text
        n_docs += 1
    if n_docs == 0:
        raise PrepareError(f"{docs}: no documents")
    if val_file is None:
        n_val = min(want_val, n_docs - 1)
        if n_val < want_val:
            if n_val == 0:
                raise PrepareError(f"{docs}: only 1 document; need at least 2 to split val and train (or --val-docs 0)")
            _log(f"note: --val-docs {want_val} capped to {n_val} so that train keeps at least one document")
            stats["train"] = {"documents": 1, "bytes": len(last_text.encode("utf-8"))}
            tok_texts = [last_text] if collect else []
        stats["val"] = {"documents": n_val, "bytes": int(sum(doc_bytes[:n_val]))}
        del doc_bytes

    stage = _stage_dir(out)
    try:
        sds, stok = stage / ds_rel, stage / tok_rel
        sds.mkdir(parents=True)
        stok.parent.mkdir(parents=True)
        if tokenizer is None:
            _log(f"training a {vocab_size}-piece SentencePiece BPE on {len(tok_texts)} train documents ...")
            train_tokenizer(tok_texts, vocab_size, stok.with_suffix(""), num_threads=workers)
            n_tok_train = len(tok_texts)
            del tok_texts
            tok_sp = _check_tokenizer(stok, vocab_size)
        else:
            shutil.copyfile(tok_src, stok)
            vocab_src = tok_src.with_suffix(".vocab")
            if vocab_src.is_file():
                shutil.copyfile(vocab_src, stok.with_suffix(".vocab"))
            else:
                _write_vocab(sp, stok.with_suffix(".vocab"))
            tok_sp = sp
            n_tok_train = 0
        del tok_sp

        # Pass 2: tokenize in order with `workers` processes and write shards.
        def split_docs():
            if val_file is not None:
                yield "val", (t for _, t in iter_documents(val_file))
                yield "train", (t for _, t in iter_documents(docs))
            else:
                it = iter_documents(docs)
                yield "val", (next(it)[1] for _ in range(n_val))
                yield "train", (t for _, t in it)

        writers = {s: _ShardWriter(sds, s, shard_tokens) for s in ("val", "train")}
        total_docs = stats["val"]["documents"] + stats["train"]["documents"]
        from tqdm import tqdm
        n_tok = 0
        with tqdm(total=total_docs, unit="doc", file=sys.stderr, disable=not progress,
                  desc=f"tokenizing ({workers} workers)", dynamic_ncols=True) as bar:
            for split, n, toks in _encode_ordered(_chunks(split_docs()), str(stok), workers):
                writers[split].add(toks)
                n_tok += toks.size
                bar.update(n)
                bar.set_postfix(tokens=f"{n_tok:,}", refresh=False)
        for w in writers.values():
            w.close()

        tg = _train_gpt()
        for split, w in writers.items():  # verify what was written with the trainer's own reader
            for name, count in zip(w.names, w.counts):
                if tg.read_shard_header(sds / name) != count:
                    raise PrepareError(f"{sds / name}: token count does not match what was written")
        manifest = {
            "format": {"magic": tg.SHARD_MAGIC, "version": tg.SHARD_VERSION, "header_bytes": tg.SHARD_HEADER_BYTES,
                       "dtype": "<u2", "bos_id": BOS_ID, "eos": False},
            "vocab_size": vocab_size,
            "tokenizer": {"path": str(tok_rel), "sha256": sha256_file(stok),
                          "source": str(tok_src) if tokenizer is not None else "trained",
                          "settings": None if tokenizer is not None else
                          {**TOKENIZER_SETTINGS, "vocab_size": vocab_size, "train_docs": n_tok_train,
                           "text": "first train-split docs; NUL->space, strip()"}},
            "splits": {s: {**stats[s], "tokens": int(sum(w.counts)), "shards": w.names, "shard_tokens": w.counts}
                       for s, w in writers.items()},
            "settings": {"docs": str(docs), "docs_sha256": sha256_file(docs),
                         "val_docs_file": str(val_file) if val_file is not None else None,
                         "val_docs_file_sha256": sha256_file(val_file) if val_file is not None else None,
                         "val_docs": None if val_file is not None else n_val, "val_docs_requested": want_val
                         if val_file is None else None, "shard_tokens": shard_tokens, "workers": workers,
                         "tokenizer_train_docs": tokenizer_train_docs, "vocab_size": vocab_size,
                         "command": command if command is not None else sys.argv},
            "build_seconds": round(time.time() - t0, 2),
        }
        tokens_written = sum(manifest["splits"][s]["tokens"] for s in writers)
        if tokens_written != n_tok:
            raise PrepareError(f"internal error: tokenized {n_tok} tokens but wrote {tokens_written}")
        (sds / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _commit(stage, out, [str(ds_rel), str(tok_rel), str(tok_rel.with_suffix(".vocab"))], force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    v, t = manifest["splits"]["val"], manifest["splits"]["train"]
    _log(f"wrote {ds_dir}: val {v['documents']:,} docs / {v['tokens']:,} tokens / {len(v['shards'])} shards, "
         f"train {t['documents']:,} docs / {t['tokens']:,} tokens / {len(t['shards'])} shards; "
         f"tokenizer {tok_path} ({time.time() - t0:.1f}s)")
    return ds_dir


def verify_dataset(ds_dir) -> dict:
    """Check a built dataset folder against its manifest.json; return the manifest or raise PrepareError."""
    ds_dir = Path(ds_dir)
    try:
        manifest = json.loads((ds_dir / "manifest.json").read_text(encoding="utf-8"))
        tok = ds_dir.parent.parent / manifest["tokenizer"]["path"]
        splits = manifest["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{ds_dir}: missing or unreadable manifest.json ({e})") from None
    tg = _train_gpt()
    listed = set()
    for s, info in splits.items():
        for name, count in zip(info["shards"], info["shard_tokens"]):
            listed.add(name)
            try:
                n = tg.read_shard_header(ds_dir / name)
            except tg.ShardError as e:
                raise PrepareError(str(e)) from None
            if n != count:
                raise PrepareError(f"{ds_dir / name}: {n} tokens, manifest says {count}")
    extra = sorted(p.name for p in ds_dir.glob("fineweb_*.bin") if p.name not in listed)
    if extra:
        raise PrepareError(f"{ds_dir}: shards not in manifest.json: {', '.join(extra)}")
    if not tok.is_file() or sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        raise PrepareError(f"{tok}: missing or different from the tokenizer the shards were built with")
    return manifest


# ----------------------------------------------------------------------------- sample
def sample(out, *, workers: int | None = None, force: bool = False, progress: bool = True) -> Path:
    """Build the embedded sample into `out` (skipped when it is already there and verifies)."""
    out = Path(out)
    ds_dir, _ = dataset_paths(out, SAMPLE_VOCAB_SIZE)
    if ds_dir.exists() and not force:
        try:  # never replace a dataset that is not a sample build (e.g. downloaded FineWeb) without --force
            command = json.loads((ds_dir / "manifest.json").read_text(encoding="utf-8"))["settings"]["command"]
        except (OSError, ValueError, KeyError, TypeError):
            command = None
        if not command or "sample" not in command[:2]:
            raise PrepareError(f"{ds_dir} exists and is not a sample build: use another --out, or --force to "
                               "replace it")
        try:
            m = verify_dataset(ds_dir)
            if (m["tokenizer"]["sha256"] == sha256_file(SAMPLE_TOKENIZER)
                    and m["settings"]["docs_sha256"] == sha256_file(SAMPLE_DOCS)
                    and m["settings"]["val_docs"] == SAMPLE_VAL_DOCS
                    and m["settings"]["shard_tokens"] == SAMPLE_SHARD_TOKENS):
                _log(f"sample data already in place: {ds_dir}")
                return ds_dir
            _log(f"{ds_dir}: built from other inputs; rebuilding")
        except PrepareError as e:
            _log(f"rebuilding sample: {e}")
    return build(SAMPLE_DOCS, out, vocab_size=SAMPLE_VOCAB_SIZE, tokenizer=SAMPLE_TOKENIZER,
                 val_docs=SAMPLE_VAL_DOCS, shard_tokens=SAMPLE_SHARD_TOKENS,
                 workers=workers if workers else min(2, os.cpu_count() or 1), force=True, progress=progress,
                 command=["prepare.py", "sample", "--out", str(out)])


# ----------------------------------------------------------------------------- download
def hf_fetch(repo_id: str, remote_path: str, dest_dir) -> Path:
    """Default fetcher: download one file of a hub dataset repo under dest_dir; return the path the hub gives.

    huggingface_hub >= 0.23 writes a regular file there; from 0.23 it also resumes an interrupted file from
    dest_dir/.cache, recent versions (2.4) restart it. Older versions return files over 5 MB as relative
    symlinks into the hub cache; download() resolves them."""
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset", local_dir=str(dest_dir)))


def hf_list_files(repo_id: str) -> list[str]:
    """Default lister: every file path in a hub dataset repo."""
    from huggingface_hub import HfApi
    return list(HfApi().list_repo_files(repo_id, repo_type="dataset"))


def _is_not_found(e: BaseException) -> bool:
    # LocalEntryNotFoundError is what huggingface_hub raises when the hub cannot be reached: not "missing".
    names = {c.__name__ for c in type(e).__mro__}
    if "LocalEntryNotFoundError" in names:
        return False
    return isinstance(e, FileNotFoundError) or "EntryNotFoundError" in names


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _variant_vocab(variant: str) -> int:
    m = re.fullmatch(r"sp([1-9]\d*)", variant)
    if not m or int(m.group(1)) > MAX_VOCAB:
        raise PrepareError(f"unknown variant {variant!r}: expected sp<vocab size>, e.g. sp4096 or sp1024")
    return int(m.group(1))


def _root_relative(rel, source: str) -> str:
    """A manifest path, checked to stay inside the remote root (and so inside DATA_DIR once placed)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise PrepareError(f"{source}: bad file path {rel!r} (must be relative to the remote root)")
    return rel


def _manifest_plan(manifest, ds_name: str, vocab: int, source: str, hint: str = "") -> tuple[int, int, list[str]]:
    """(val shard count, train shard count, tokenizer files) that an upstream manifest gives for ds_name."""
    try:
        datasets = {d["name"]: d for d in manifest["datasets"]}
        tokenizers = {t["name"]: t for t in manifest["tokenizers"]}
    except (KeyError, TypeError):
        raise PrepareError(f"{source}: not a data manifest (needs 'datasets' and 'tokenizers' lists of named "
                           "entries)") from None
    if ds_name not in datasets:
        raise PrepareError(f"{source} does not list dataset {ds_name} (it lists: "
                           f"{', '.join(sorted(datasets)) or 'none'}){hint}")
    ds = datasets[ds_name]
    try:
        n_val, n_train = int(ds["stats"]["files_val"]), int(ds["stats"]["files_train"])
        tok_name = ds["tokenizer_name"]
    except (KeyError, TypeError, ValueError):
        raise PrepareError(f"{source}: dataset {ds_name} lacks tokenizer_name or stats.files_val/files_train") from None
    if ds.get("vocab_size", vocab) != vocab:
        raise PrepareError(f"{source}: dataset {ds_name} has vocab_size {ds['vocab_size']}, expected {vocab}")
    if n_val < 1:
        raise PrepareError(f"{source}: dataset {ds_name} lists no val shards")
    if tok_name not in tokenizers:
        raise PrepareError(f"{source} does not list tokenizer {tok_name!r} (used by {ds_name}){hint}")
    tok = tokenizers[tok_name]
    files: list[str] = []
    for key in ("model_path", "vocab_path", "path"):  # every one that is set, as upstream downloads them
        if tok.get(key) and tok[key] not in files:
            files.append(_root_relative(tok[key], source))
    if not any(f.endswith(".model") for f in files):
        raise PrepareError(f"{source}: tokenizer {tok_name!r} lists no SentencePiece .model file")
    return n_val, n_train, files


def _listing_plan(listed: set[str], pre: str, ds_name: str, tok_stem: str, train_shards: int,
                  where: str) -> tuple[int, list[str]]:
    """(val shard count, tokenizer files) from a repo's file listing, only under the remote root `pre` (so two
    exports of one dataset in the repo are never mixed); train shards 0..train_shards-1 must be listed."""
    folder = f"{pre}datasets/{ds_name}"
    pat = re.compile(rf"{re.escape(folder)}/fineweb_(val|train)_(\d{{6}})\.bin")
    have: dict[str, set[int]] = {"val": set(), "train": set()}
    for f in listed:
        m = pat.fullmatch(f)
        if m:
            have[m.group(1)].add(int(m.group(2)))
    if not have["val"]:
        raise PrepareError(f"no {folder}/fineweb_val_*.bin in {where}")
    n_val = max(have["val"]) + 1
    for split, n in (("val", n_val), ("train", train_shards)):
        for i in range(n):
            if i in have[split]:
                continue
            if have[split] and i < max(have[split]):
                raise PrepareError(f"{folder}/fineweb_{split}_{i:06d}.bin is missing from {where} (shards are "
                                   "numbered from 000000 without gaps)")
            raise PrepareError(f"{where} has {len(have[split])} {ds_name} {split} shards, {n} requested")
    tok_files = [f"tokenizers/{tok_stem}.model", f"tokenizers/{tok_stem}.vocab"]
    if pre + tok_files[0] not in listed:
        raise PrepareError(f"no {pre + tok_files[0]} in {where}")
    return n_val, [f for f in tok_files if pre + f in listed]


def _check_file(path: Path, name: str, vocab: int, sha256: str | None) -> None:
    """Raise PrepareError unless `path` is a usable copy of the file called `name` (a hub-cache blob, which
    older huggingface_hub versions link to, is named by its hash: the kind comes from `name`)."""
    if name.endswith(".bin"):
        tg = _train_gpt()
        try:
            tg.read_shard_header(path)  # magic, version and exact size
        except tg.ShardError as e:
            raise PrepareError(str(e)) from None
    elif name.endswith(".model"):
        _check_tokenizer(path, vocab)
    elif name.endswith(".vocab"):
        with open(path, encoding="utf-8", errors="replace") as f:
            n = sum(1 for _ in f)
        if n != vocab:
            raise PrepareError(f"{path}: {n} lines, expected {vocab}")
    elif name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PrepareError(f"{path}: not readable JSON ({e})") from None
    elif name.endswith(".jsonl"):
        with open(path, "rb") as f:
            first = f.readline()
        try:
            ok = isinstance(json.loads(first).get("text"), str)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise PrepareError(f'{path}: first line is not a JSON object with a string "text"')
    if sha256 is not None and sha256_file(path) != sha256.lower():
        raise PrepareError(f"{path}: sha256 differs from the manifest's {sha256}")


def _staged(got: Path, staging: Path) -> bool:
    """Whether the fetcher's file is our own copy in staging (huggingface_hub >= 0.23), not a link into a cache."""
    return not got.is_symlink() and Path(os.path.realpath(got)).is_relative_to(os.path.realpath(staging))


def _place(got: Path, staging: Path, local: Path) -> None:
    """Put a fetched, verified file at `local` as a regular file: never a link, never a partial file."""
    real = Path(os.path.realpath(got))
    tmp = local.with_name(f".{local.name}.part")  # hidden, so never matched by the trainer's shard globs
    try:
        tmp.unlink(missing_ok=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        if _staged(got, staging):
            try:
                os.replace(real, tmp)  # a rename, no copy
            except OSError:  # staging on another filesystem
                shutil.copyfile(real, tmp)
        else:  # a blob in the hub cache (older huggingface_hub's symlinks): copy it, the cache keeps its own
            shutil.copyfile(real, tmp)
        os.replace(tmp, local)
    except OSError as e:
        raise PrepareError(f"cannot write {local}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def download(variant: str, *, data_dir=DATA_ROOT, train_shards: int = DEFAULT_TRAIN_SHARDS, repo_id: str | None = None,
             remote_root: str = DEFAULT_REMOTE_ROOT, skip_manifest: bool = False, with_docs: bool = False,
             fetch: Callable[[str, str, Path], object] = hf_fetch,
             list_files: Callable[[str], Sequence[str]] | None = hf_list_files) -> Path:
    """Fetch all val shards, the first `train_shards` train shards and the tokenizer into data_dir (upstream's
    layout: the remote root prefix is dropped); return the dataset folder.

    The counts and tokenizer files come from `<remote_root>/manifest.json`, which is also written to
    data_dir/manifest.json (skip_manifest: use that local copy instead of fetching it). Without a manifest on
    the hub, the repo's file listing under remote_root is used. Missing shard numbers are errors.

    fetch(repo_id, remote_path, dest_dir) downloads one file under dest_dir and returns its path, which may be
    a symlink (relative or not) to the real file; it raises FileNotFoundError or huggingface_hub's
    EntryNotFoundError when the file does not exist. dest_dir is a staging folder that survives a failed run,
    so that a hub version that resumes an interrupted file can. Every file is checked (shard header and size, tokenizer, the
    manifest's sha256 when it gives one) before it is placed, as a regular file, by an atomic rename; files
    already in place that pass the same checks are not fetched again.
    """
    vocab = _variant_vocab(variant)
    if train_shards < 0:
        raise PrepareError("--train-shards must be >= 0")
    repo_id = repo_id or VARIANT_REPOS.get(variant, UPSTREAM_REPO)
    root = remote_root.strip("/")
    pre = f"{root}/" if root else ""
    data_dir = Path(data_dir)
    ds_dir, tok_path = dataset_paths(data_dir, vocab)
    ds_name = ds_dir.name
    if (ds_dir / "manifest.json").exists():  # shards and tokenizer of our own build carry the same names
        raise PrepareError(f"{ds_dir} holds a dataset built by prepare.py (manifest.json): download into another "
                           "--data-dir")
    local_manifest = data_dir / "manifest.json"
    staging = data_dir / f".download-{ds_name}"  # kept when a run fails: partial files a hub version resumes
    counters = {"fetched": 0, "skipped": 0}

    def fetch_one(rel: str, optional: bool = False) -> Path | None:
        remote = pre + rel
        staging.mkdir(parents=True, exist_ok=True)
        try:
            return Path(fetch(repo_id, remote, staging))
        except Exception as e:
            if _is_not_found(e):
                if optional:
                    return None
                raise PrepareError(f"{remote} not found in hub dataset {repo_id}") from None
            raise PrepareError(f"fetching {remote} from {repo_id} failed: {_one_line(e)}") from None

    def get(rel: str, local: Path) -> None:
        want = sha256s.get(rel)
        if local.exists():
            try:
                _check_file(local, local.name, vocab, want)
                counters["skipped"] += 1
                return
            except PrepareError as e:
                _log(f"re-fetching {local.name}: local copy does not verify ({e})")
        got = fetch_one(rel)
        try:
            _check_file(Path(os.path.realpath(got)), local.name, vocab, want)
        except PrepareError as e:
            if _staged(got, staging):  # else the hub would hand the same bytes back next time
                got.unlink()
            raise PrepareError(f"downloaded {pre + rel} from {repo_id} does not verify: {e}") from None
        _place(got, staging, local)
        counters["fetched"] += 1
        _log(f"fetched {pre + rel} -> {local}")

    if skip_manifest:
        if not local_manifest.is_file():
            raise PrepareError(f"--skip-manifest needs {local_manifest}; run without --skip-manifest to fetch it "
                               f"from {repo_id}")
        fetched_manifest, manifest_file = None, local_manifest
        source, hint = str(local_manifest), ": delete it and run without --skip-manifest to fetch the hub's"
    else:
        fetched_manifest = fetch_one("manifest.json", optional=True)
        manifest_file = fetched_manifest and Path(os.path.realpath(fetched_manifest))
        source, hint = f"{pre}manifest.json in hub dataset {repo_id}", ""
    if manifest_file is not None:
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PrepareError(f"{source}: not readable JSON ({e})") from None
        n_val, n_train, tok_files = _manifest_plan(manifest, ds_name, vocab, source, hint)
        if train_shards > n_train:
            raise PrepareError(f"{source} lists {n_train} {ds_name} train shards, {train_shards} requested")
        # Upstream's manifest has no checksums; a top-level {path under the root: sha256} map is honoured.
        sha256s = manifest.get("sha256")
        sha256s = sha256s if isinstance(sha256s, dict) else {}
        if fetched_manifest is not None:
            _place(fetched_manifest, staging, local_manifest)
    else:
        if list_files is None:
            raise PrepareError(f"no {pre}manifest.json in hub dataset {repo_id}, and no file listing to fall back on")
        _log(f"note: no {pre}manifest.json in hub dataset {repo_id}; using its file listing under {pre or '/'}")
        try:
            listed = set(list_files(repo_id))
        except Exception as e:
            raise PrepareError(f"listing hub dataset {repo_id} failed: {_one_line(e)}") from None
        n_val, tok_files = _listing_plan(listed, pre, ds_name, tok_path.stem, train_shards, f"hub dataset {repo_id}")
        sha256s = {}

    for rel in tok_files:
        get(rel, data_dir / rel)
    model = data_dir / next(f for f in tok_files if f.endswith(".model"))
    for split, n in (("val", n_val), ("train", train_shards)):
        for i in range(n):
            name = f"fineweb_{split}_{i:06d}.bin"
            get(f"datasets/{ds_name}/{name}", ds_dir / name)
    if with_docs:
        for rel in DOCS_FILES:
            get(rel, data_dir / rel)
    shutil.rmtree(staging, ignore_errors=True)
    _log(f"{ds_dir}: {n_val} val + {train_shards} train shards and tokenizer {model} in place "
         f"({counters['fetched']} files fetched, {counters['skipped']} already present and verified)")
    if model != tok_path:
        _log(f"note: train_gpt.py looks for {tok_path}; run it with TOKENIZER_PATH={model}")
    return ds_dir


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="fetch published shards + tokenizer from the Hugging Face hub",
                       description=f"Env vars (upstream's): {REPO_ENV} (hub dataset repo; default "
                                   f"{VARIANT_REPOS['sp4096']} for sp4096, else {UPSTREAM_REPO}), "
                                   f"{REMOTE_ROOT_ENV} (folder in the repo; default {DEFAULT_REMOTE_ROOT}).")
    d.add_argument("--variant", required=True, help="sp<vocab size>, e.g. sp4096 or sp1024")
    d.add_argument("--train-shards", type=int, default=None,
                   help=f"number of train shards (default {DEFAULT_TRAIN_SHARDS}); val is always fetched in full")
    d.add_argument("train_shards_arg", nargs="?", type=int, default=None, metavar="TRAIN_SHARDS",
                   help="the same as --train-shards (upstream accepts it bare)")
    d.add_argument("--skip-manifest", action="store_true",
                   help="use DATA_DIR/manifest.json as it is instead of fetching the hub's")
    d.add_argument("--with-docs", action="store_true", help=f"also fetch {' and '.join(DOCS_FILES)}")
    d.add_argument("--repo-id", default=None, help=f"hub dataset repo (wins over {REPO_ENV})")
    d.add_argument("--data-dir", default=str(DATA_ROOT), help="DATA_DIR of the layout (default: this folder)")

    b = sub.add_parser("build", help="tokenize a JSONL(.xz) corpus into shards")
    b.add_argument("--docs", required=True, help="JSONL(.xz), one {\"text\": ...} per line")
    b.add_argument("--out", required=True, help="DATA_DIR to write the layout into")
    b.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default 4096, or the --tokenizer's size)")
    b.add_argument("--tokenizer", default=None, help="use this SentencePiece .model instead of training one")
    b.add_argument("--val-docs", type=int, default=None,
                   help=f"first N documents go to val (default {DEFAULT_VAL_DOCS}, capped so train keeps >= 1)")
    b.add_argument("--val-docs-file", default=None, help="take val from this JSONL(.xz); all --docs go to train")
    b.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    b.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    b.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS)
    b.add_argument("--force", action="store_true", help="replace an existing dataset folder / tokenizer")
    b.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="build the embedded sample (data/sample/) into DATA_DIR")
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--force", action="store_true", help="rebuild even if the output verifies")
    s.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "download":
            counts = {n for n in (args.train_shards, args.train_shards_arg) if n is not None}
            if len(counts) > 1:
                raise PrepareError("train shard count given twice, with different values")
            train_shards = counts.pop() if counts else DEFAULT_TRAIN_SHARDS
            download(args.variant, data_dir=args.data_dir, train_shards=train_shards,
                     repo_id=args.repo_id or os.environ.get(REPO_ENV) or None,
                     remote_root=os.environ.get(REMOTE_ROOT_ENV, DEFAULT_REMOTE_ROOT),
                     skip_manifest=args.skip_manifest, with_docs=args.with_docs,
                     fetch=hf_fetch, list_files=hf_list_files)  # looked up now, so tests can stand in a fake hub
        elif args.cmd == "build":
            build(args.docs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer, val_docs=args.val_docs,
                  val_docs_file=args.val_docs_file, shard_tokens=args.shard_tokens, workers=args.workers,
                  tokenizer_train_docs=args.tokenizer_train_docs, force=args.force,
                  progress=not args.no_progress, command=["prepare.py", *argv])
        else:
            path = sample(args.out, workers=args.workers, force=args.force, progress=not args.no_progress)
            print(path)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
