#!/usr/bin/env python3
"""Data tool for train_gpt.py: fetch, build or sample token shards in the challenge format.

Subcommands (``python data/prepare.py SUBCOMMAND --help`` for options):

``download``  fetch the published FineWeb shards and tokenizer from the Hugging Face hub
              (``--variant sp4096`` from ``kevclark/parameter-golf``, ``sp1024`` from
              ``willdepueoai/parameter-golf``). All val shards and the first ``--train-shards``
              train shards. Resumable: a local file that verifies is not fetched again.
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

VARIANTS = {  # variant -> (default hub dataset repo, vocab size)
    "sp4096": ("kevclark/parameter-golf", 4096),
    "sp1024": ("willdepueoai/parameter-golf", 1024),
}
# In-repo roots tried, in order, when the hub file listing is unavailable.
REMOTE_PREFIXES = ("datasets/", "")

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
    """Write one shard atomically (temp file + os.replace); return its token count."""
    tg = _train_gpt()
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {toks.shape}")
    if toks.size and (not np.issubdtype(toks.dtype, np.integer) or toks.min() < 0 or toks.max() >= MAX_VOCAB):
        raise ValueError(f"{path}: tokens must be integers in [0, {MAX_VOCAB})")
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = tg.SHARD_MAGIC, tg.SHARD_VERSION, toks.size
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(toks.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
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
    """Default fetcher: download one file of a hub dataset repo into dest_dir; return its local path."""
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


def download(variant: str, *, data_dir=DATA_ROOT, train_shards: int = DEFAULT_TRAIN_SHARDS, repo_id: str | None = None,
             fetch: Callable[[str, str, Path], object] | None = hf_fetch,
             list_files: Callable[[str], Sequence[str]] | None = hf_list_files) -> Path:
    """Fetch all val shards, `train_shards` train shards and the tokenizer into data_dir; return the dataset folder.

    fetch(repo_id, remote_path, dest_dir) must download one file somewhere under dest_dir and return its path
    (raising FileNotFoundError or huggingface_hub's EntryNotFoundError when the file does not exist).
    list_files(repo_id) returns the repo's file paths; None or a failure falls back to probing.
    Files already present that verify are skipped; corrupt ones are fetched again. Every shard is checked
    with train_gpt.read_shard_header before it is moved into place.
    """
    if variant not in VARIANTS:
        raise PrepareError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if train_shards < 0:
        raise PrepareError("--train-shards must be >= 0")
    default_repo, vocab = VARIANTS[variant]
    repo_id = repo_id or default_repo
    fetch = fetch or hf_fetch
    data_dir = Path(data_dir)
    ds_dir, tok_path = dataset_paths(data_dir, vocab)
    if (ds_dir / "manifest.json").exists():  # shards and tokenizer of our own build carry the same names
        raise PrepareError(f"{ds_dir} holds a dataset built by prepare.py (manifest.json): download into another "
                           "--data-dir")
    tg = _train_gpt()
    ds_name, tok_name = ds_dir.name, tok_path.name

    def check_shard(p: Path) -> None:
        try:
            tg.read_shard_header(p)
        except tg.ShardError as e:
            raise PrepareError(str(e)) from None

    def check_tok(p: Path) -> None:
        _check_tokenizer(p, vocab)

    def check_vocab(p: Path) -> None:
        with open(p, encoding="utf-8", errors="replace") as f:
            n = sum(1 for _ in f)
        if n != vocab:
            raise PrepareError(f"{p}: {n} lines, expected {vocab}")

    files = None
    if list_files is not None:
        try:
            files = list(list_files(repo_id))
        except Exception as e:  # offline, private repo, ...: fall back to probing
            _log(f"note: could not list {repo_id} ({_one_line(e)}); probing paths instead")
    counters = {"fetched": 0, "skipped": 0}
    ds_dir.mkdir(parents=True, exist_ok=True)
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))

    def get(remote: str, local: Path, check: Callable[[Path], None], optional: bool = False) -> bool:
        if local.exists():
            try:
                check(local)
                counters["skipped"] += 1
                return True
            except PrepareError as e:
                _log(f"re-fetching {local.name}: local copy does not verify ({e})")
        try:
            got = Path(fetch(repo_id, remote, staging))
        except Exception as e:
            if _is_not_found(e):
                if optional:
                    return False
                raise PrepareError(f"{remote} not found in hub dataset {repo_id}") from None
            raise PrepareError(f"fetching {remote} from {repo_id} failed: {_one_line(e)}") from None
        try:
            check(got)
        except PrepareError as e:
            got.unlink(missing_ok=True)
            raise PrepareError(f"downloaded {remote} from {repo_id} does not verify: {e}") from None
        try:
            os.replace(got, local)
        except OSError:  # different filesystem
            tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
            shutil.copyfile(got, tmp)
            os.replace(tmp, local)
        counters["fetched"] += 1
        _log(f"fetched {remote} -> {local}")
        return True

    try:
        if files is not None:
            pat = re.compile(rf"^(.*?){re.escape(ds_name)}/fineweb_(val|train)_(\d{{6}})\.bin$")
            shards = {"val": {}, "train": {}}
            for f in files:
                m = pat.match(f)
                if m:
                    shards[m.group(2)][int(m.group(3))] = f
            toks = sorted((f for f in files if f.rsplit("/", 1)[-1] == tok_name),
                          key=lambda f: ("tokenizers/" not in f, len(f)))
            if not shards["val"]:
                raise PrepareError(f"no {ds_name}/fineweb_val_*.bin files in hub dataset {repo_id}")
            if not toks:
                raise PrepareError(f"no {tok_name} in hub dataset {repo_id}")
            have = sorted(shards["train"])
            if len(have) < train_shards:
                raise PrepareError(f"hub dataset {repo_id} has {len(have)} {ds_name} train shards, "
                                   f"{train_shards} requested")
            remote_tok = toks[0]
            get(remote_tok, tok_path, check_tok)
            vocab_remote = remote_tok[:-len(".model")] + ".vocab"
            if vocab_remote in files:
                get(vocab_remote, tok_path.with_suffix(".vocab"), check_vocab)
            for i in sorted(shards["val"]):
                get(shards["val"][i], ds_dir / shards["val"][i].rsplit("/", 1)[-1], check_shard)
            for i in have[:train_shards]:
                get(shards["train"][i], ds_dir / shards["train"][i].rsplit("/", 1)[-1], check_shard)
        else:
            prefix = None
            for pre in REMOTE_PREFIXES:
                if get(f"{pre}tokenizers/{tok_name}", tok_path, check_tok, optional=True):
                    prefix = pre
                    break
            if prefix is None:
                raise PrepareError(f"{tok_name} not found in hub dataset {repo_id} "
                                   f"(tried {', '.join(p + 'tokenizers/' for p in REMOTE_PREFIXES)})")
            get(f"{prefix}tokenizers/{tok_path.with_suffix('.vocab').name}", tok_path.with_suffix(".vocab"),
                check_vocab, optional=True)
            i = 0
            while get(f"{prefix}datasets/{ds_name}/fineweb_val_{i:06d}.bin", ds_dir / f"fineweb_val_{i:06d}.bin",
                      check_shard, optional=i > 0):
                i += 1
            for i in range(train_shards):
                name = f"fineweb_train_{i:06d}.bin"
                get(f"{prefix}datasets/{ds_name}/{name}", ds_dir / name, check_shard)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"{ds_dir}: {counters['fetched']} files fetched, {counters['skipped']} already present and verified")
    return ds_dir


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="fetch published shards + tokenizer from the Hugging Face hub")
    d.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    d.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help=f"number of train shards (default {DEFAULT_TRAIN_SHARDS}); val is always fetched in full")
    d.add_argument("--repo-id", default=None, help="hub dataset repo (default depends on --variant)")
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
            download(args.variant, data_dir=args.data_dir, train_shards=args.train_shards, repo_id=args.repo_id)
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
