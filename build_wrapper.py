#!/usr/bin/env python3
"""Build the self-extracting train_gpt.py wrapper and assemble record folders.

Wrapper (spec section 4.7)::

    python build_wrapper.py [train_gpt.py] -o OUT/train_gpt.py [--strip] [--check-only]

The source (optionally stripped of comments and docstrings) is compressed as an
.xz container holding one LZMA2 filter, base85-encoded and written as::

    import lzma as L,base64 as B
    exec(L.decompress(B.b85decode("...."
    "...."
    "....")))

Every line is at most 100 characters and the file has no trailing newline (one
byte saved, as in the reference record).  The decoded code runs in the
wrapper's own module namespace, so ``__file__`` is the wrapper and the trainer's
"Code size" counts the wrapper's bytes.  Before anything is written the payload
is decoded back out of the generated text and compared byte for byte with the
intended source; on a mismatch nothing is written and the exit status is 1.

Record folder::

    python build_wrapper.py record --logs A.txt B.txt C.txt --name NAME --author WHO \
        [--github-id ID] [--baseline-bpb x,y,z] [--script train_gpt.py] [--out DIR]

writes the wrapped train_gpt.py, the logs, submission.json, README.md and
train_curves.png into DIR, or nothing at all if any check fails.  Each log must hold
exactly one training run (EVAL_ONLY re-score runs appended to it are ignored); all
logs must share code, tokenizer, data fingerprint, hyperparameters (apart from
seed, ids, ranks and per-run paths) and score line.  ``--force`` replaces only a
previous record folder (one holding submission.json), never one holding the current
directory, the script or a log.

The first positional word ``record`` selects the second mode; to wrap a file
that is literally called ``record`` write ``./record``.
"""
from __future__ import annotations

import argparse
import ast
import base64
import datetime as _dt
import hashlib
import io
import json
import lzma
import math
import os
import re
import shutil
import sys
import tempfile
import token as _token
import tokenize

MAX_LINE = 100
MAX_ARTIFACT_BYTES = 16_000_000
MAX_TRAIN_MS = 600_000
MAX_EVAL_MS = 600_000  # the challenge's evaluation time limit
# Hyperparameters that may differ between the seeds of one record (ids, ranks, per-run paths).
HPARAMS_MAY_DIFFER = frozenset({"seed", "run_id", "rank", "local_rank", "out_dir", "dump_token_nll"})
DEFAULT_TRACK = "10min_16mb"

HEADER = "import lzma as L,base64 as B\n"
CALL_OPEN = "exec(L.decompress(B.b85decode("
CALL_CLOSE = ")))"
# Python's base85 alphabet (RFC 1924 order); it has no quote, backslash or whitespace.
B85_ALPHABET = (b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                b"abcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~")
XZ_CHECKS = {"crc64": lzma.CHECK_CRC64, "crc32": lzma.CHECK_CRC32, "none": lzma.CHECK_NONE}


class WrapperError(RuntimeError):
    """The wrapper could not be built or did not decode back to the source."""


class StripError(WrapperError):
    """Stripping comments/docstrings would change the program."""


class RecordError(RuntimeError):
    """A record folder cannot be assembled from the given logs."""


# --------------------------------------------------------------------------- stripping

def _is_docstring_node(stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def remove_docstrings(tree: ast.AST) -> ast.AST:
    """Drop docstrings from an AST in place (an emptied body gets ``pass``); return it."""
    for node in ast.walk(tree):
        if isinstance(node, _DOC_OWNERS) and node.body and _is_docstring_node(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def _split_lines(src: str) -> list[str]:
    """Lines with their ends, split on "\n" only -- like tokenize and the parser, unlike
    ``str.splitlines`` (which also splits on \x0c, \x1c-\x1e, \x85, U+2028, U+2029 ...)."""
    parts = src.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _line_offsets(src: str) -> list[int]:
    offs, pos = [0], 0
    for line in _split_lines(src):
        pos += len(line)
        offs.append(pos)
    return offs


def _string_rows(src: str) -> tuple[set[int], set[int]]:
    """Rows (1-based) whose start / whose end lies inside a multi-line string token.

    The first set may not be re-indented or dropped, the second may not be
    right-stripped.  Python >= 3.12 tokenises f-strings as FSTRING_START..END.
    """
    head: set[int] = set()
    tail: set[int] = set()

    def span(r0, r1):
        if r1 > r0:
            head.update(range(r0 + 1, r1 + 1))
            tail.update(range(r0, r1))

    fstart = getattr(_token, "FSTRING_START", None)
    fend = getattr(_token, "FSTRING_END", None)
    stack = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING:
            span(tok.start[0], tok.end[0])
        elif fstart is not None and tok.type == fstart:
            stack.append(tok.start[0])
        elif fend is not None and tok.type == fend and stack:
            span(stack.pop(), tok.end[0])
    return head, tail


def _logical_line_depths(src: str) -> dict[int, int]:
    """Row -> block depth for rows on which a logical line starts."""
    depths, depth, at_start = {}, 0, True
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            at_start = True
        elif tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER):
            pass
        elif at_start:
            depths[tok.start[0]] = depth
            at_start = False
    return depths


def _strip_once(src: str) -> str:
    tree = ast.parse(src)
    offs = _line_offsets(src)
    lines = _split_lines(src)

    def char_offset(lineno: int, byte_col: int) -> int:  # ast columns are UTF-8 byte offsets
        line = lines[lineno - 1]
        return offs[lineno - 1] + len(line.encode("utf-8")[:byte_col].decode("utf-8"))

    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in character offsets
    for node in ast.walk(tree):
        if not (isinstance(node, _DOC_OWNERS) and node.body and _is_docstring_node(node.body[0])):
            continue
        doc = node.body[0]
        start = char_offset(doc.lineno, doc.col_offset)
        end = char_offset(doc.end_lineno, doc.end_col_offset)
        m = re.compile(r"[ \t]*;[ \t]*").match(src, end)  # `"""doc"""; x = 1`
        if m:
            end = m.end()
        edits.append((start, end, "pass" if len(node.body) == 1 else ""))
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            s = offs[tok.start[0] - 1] + tok.start[1]
            edits.append((s, offs[tok.end[0] - 1] + tok.end[1], ""))
    edits.sort()
    out, pos = [], 0
    for s, e, rep in edits:
        if s < pos:  # overlapping edits cannot happen for valid code; be safe anyway
            raise StripError(f"overlapping edits at offset {s}")
        out.append(src[pos:s])
        out.append(rep)
        pos = e
    out.append(src[pos:])
    text = "".join(out)

    # Re-indent one space per block level, squeeze continuation-line indentation to one
    # space, drop trailing whitespace and blank lines -- never inside multi-line strings.
    head, tail = _string_rows(text)
    depths = _logical_line_depths(text)
    result = []
    for i, line in enumerate(_split_lines(text), start=1):
        if i in head:  # starts inside a string: leave as is
            result.append(line)
            continue
        body = line.lstrip(" \t")
        if i in depths:
            body = " " * depths[i] + body
        elif body != line:
            body = " " + body
        if i in tail:  # ends inside a string
            result.append(body)
        elif body.strip():
            result.append(body.rstrip() + "\n")
    return "".join(result)


def strip_source(src: str) -> str:
    """Remove comments, docstrings, blank lines and trailing whitespace; indent by 1 space/level.

    Uses ``ast`` (to locate docstrings) and ``tokenize`` (to locate comments and
    multi-line strings); no other string literal is touched.  The result is
    verified: ``ast.dump`` of the stripped module must equal ``ast.dump`` of the
    original with its docstrings removed, otherwise :class:`StripError`.
    A source that reads ``__doc__`` is refused, since stripping would change it.
    """
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise StripError(f"source does not parse: {e}") from None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "__doc__") or \
                (isinstance(node, ast.Attribute) and node.attr == "__doc__"):
            raise StripError(f"source reads __doc__ (line {node.lineno}); stripping docstrings "
                             "would change behaviour")
    expected = ast.dump(remove_docstrings(tree))
    out = _strip_once(src)
    try:
        got = ast.dump(ast.parse(out))
    except SyntaxError as e:
        raise StripError(f"stripped source does not parse: {e}") from None
    if got != expected:
        raise StripError("stripped source is not AST-equivalent to the original "
                         "(minus docstrings)")
    return out


# --------------------------------------------------------------------------- compression

_PRESET_DICT = [1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 22, 1 << 23, 1 << 23, 1 << 24, 1 << 25,
                1 << 26]  # liblzma's dict_size for presets 0..9


def _candidate_filters(n: int):
    """(description, LZMA2 filter) candidates for ``n`` input bytes, preferred first on ties.

    The dictionary is capped at the first power of two >= n (a larger window cannot
    find more matches); this makes no measured size difference for presets >= 1 but
    makes the search ~5x faster and lowers the decoder's memory.
    """
    cap = max(1 << 12, 1 << max(n - 1, 1).bit_length())
    for preset in range(10):
        for extreme in (False, True):
            p = preset | (lzma.PRESET_EXTREME if extreme else 0)
            yield (f"preset={preset}{'e' if extreme else ''}",
                   {"id": lzma.FILTER_LZMA2, "preset": p, "dict_size": min(_PRESET_DICT[preset], cap)})
    # Tuned LZMA2 literal/position bits.  On Python sources lp=0 and pb=0 win by
    # 60-90 bytes over preset 9e; nice_len made no difference (measured).
    for lc in range(5):
        for pb in range(3):
            yield (f"preset=9e,lc={lc},lp=0,pb={pb}",
                   {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                    "dict_size": cap, "lc": lc, "lp": 0, "pb": pb})


def compress_payload(data: bytes, check: str = "crc64") -> tuple[bytes, str]:
    """Compress ``data`` as .xz/LZMA2, trying every candidate; return (smallest, description).

    The result always decodes with plain ``lzma.decompress``.
    """
    best = None
    for desc, filt in _candidate_filters(len(data)):
        blob = lzma.compress(data, format=lzma.FORMAT_XZ, check=XZ_CHECKS[check], filters=[filt])
        if best is None or len(blob) < len(best[0]):
            best = (blob, f"{desc},dict={filt['dict_size']}")
    blob, desc = best
    if lzma.decompress(blob) != data:  # paranoia: liblzma must round-trip
        raise WrapperError(f"lzma round-trip failed for {desc}")
    return blob, f"xz check={check} lzma2({desc})"


# --------------------------------------------------------------------------- wrapper

def _layout(b85: str, max_line: int = MAX_LINE) -> str:
    """Adjacent string literals filling lines of at most ``max_line`` characters."""
    if max_line < len(CALL_OPEN) + 3 or max_line < len(CALL_CLOSE) + 3:
        raise WrapperError(f"max_line {max_line} too small")
    lines, pos, prefix = [], 0, CALL_OPEN
    while True:
        room = max_line - len(prefix) - 2
        chunk = b85[pos:pos + room]
        pos += len(chunk)
        if pos >= len(b85) and len(prefix) + len(chunk) + 2 + len(CALL_CLOSE) <= max_line:
            lines.append(f'{prefix}"{chunk}"{CALL_CLOSE}')
            break
        if pos >= len(b85):  # closing parens do not fit on this line
            lines.append(f'{prefix}"{chunk}"')
            lines.append(CALL_CLOSE)
            break
        lines.append(f'{prefix}"{chunk}"')
        prefix = ""
    return HEADER + "\n".join(lines)  # no trailing newline: one byte less


def _b85_literal_ok(text: str) -> bool:
    return set(text.encode("ascii")) <= set(B85_ALPHABET)


def extract_source(wrapper_text: str) -> str:
    """Parse a generated wrapper and return the source it executes.

    Checks the exact shape (imports, then ``exec(L.decompress(B.b85decode(<str>)))``)
    and raises :class:`WrapperError` for anything else.
    """
    try:
        tree = ast.parse(wrapper_text)
    except SyntaxError as e:
        raise WrapperError(f"wrapper is not valid Python: {e}") from None
    if len(tree.body) != 2:
        raise WrapperError("wrapper must have exactly two statements")
    imp, stmt = tree.body
    if not (isinstance(imp, ast.Import)
            and [(a.name, a.asname) for a in imp.names] == [("lzma", "L"), ("base64", "B")]):
        raise WrapperError("wrapper line 1 must be 'import lzma as L,base64 as B'")

    def call(node, func_src):
        ok = (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
              and ast.unparse(node.func) == func_src)
        if not ok:
            raise WrapperError(f"wrapper does not call {func_src}(...) where expected")
        return node.args[0]

    if not isinstance(stmt, ast.Expr):
        raise WrapperError("wrapper statement 2 is not an expression")
    lit = call(call(call(stmt.value, "exec"), "L.decompress"), "B.b85decode")
    if not (isinstance(lit, ast.Constant) and isinstance(lit.value, str)):
        raise WrapperError("b85decode argument is not a string literal")
    if not _b85_literal_ok(lit.value):
        raise WrapperError("payload literal contains characters outside the base85 alphabet")
    try:
        raw = lzma.decompress(base64.b85decode(lit.value))
        return raw.decode("utf-8")
    except (ValueError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise WrapperError(f"payload does not decode: {type(e).__name__}: {e}") from None


def verify_wrapper(wrapper_text: str, intended: str, max_line: int = MAX_LINE) -> None:
    """Raise :class:`WrapperError` unless ``wrapper_text`` is a valid wrapper of ``intended``."""
    try:
        compile(wrapper_text, "<wrapper>", "exec")
    except SyntaxError as e:
        raise WrapperError(f"wrapper does not compile: {e}") from None
    long_lines = [i for i, l in enumerate(wrapper_text.split("\n"), 1) if len(l) > max_line]
    if long_lines:
        raise WrapperError(f"wrapper lines longer than {max_line}: {long_lines[:5]}")
    got = extract_source(wrapper_text).encode("utf-8")
    want = intended.encode("utf-8")
    if got != want:
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise WrapperError(f"payload mismatch: decoded {len(got)} bytes, intended {len(want)} "
                           f"bytes, first difference at byte {n}")


def build_wrapper(src: str, strip: bool = False, check: str = "crc64",
                  max_line: int = MAX_LINE) -> dict:
    """Build and verify a wrapper; return a report dict (``wrapper`` holds the text)."""
    code = strip_source(src) if strip else src
    try:
        compile(code, "<source>", "exec")
    except SyntaxError as e:
        raise WrapperError(f"source does not compile: {e}") from None
    payload, desc = compress_payload(code.encode("utf-8"), check=check)
    b85 = base64.b85encode(payload).decode("ascii")
    if not _b85_literal_ok(b85) or '"' in b85 or "\\" in b85:
        raise WrapperError("base85 text contains characters unsafe in a string literal")
    wrapper = _layout(b85, max_line)
    verify_wrapper(wrapper, code, max_line)
    return {
        "wrapper": wrapper,
        "code": code,
        "source_bytes": len(src.encode("utf-8")),
        "stripped_bytes": len(code.encode("utf-8")) if strip else None,
        "payload_bytes": len(payload),
        "b85_chars": len(b85),
        "wrapper_bytes": len(wrapper.encode("utf-8")),
        "compression": desc,
    }


def make_wrapper(src: str, strip: bool = False, check: str = "crc64") -> str:
    """Return the verified self-extracting wrapper text for ``src``."""
    return build_wrapper(src, strip=strip, check=check)["wrapper"]


def atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_report(rep: dict) -> str:
    rows = [("source bytes", rep["source_bytes"])]
    if rep.get("stripped_bytes") is not None:
        rows.append(("stripped bytes", rep["stripped_bytes"]))
    rows += [("payload bytes (xz)", rep["payload_bytes"]), ("base85 chars", rep["b85_chars"]),
             ("wrapper bytes", rep["wrapper_bytes"]), ("compression", rep["compression"])]
    return "\n".join(f"{k:>20}: {v}" for k, v in rows)


# --------------------------------------------------------------------------- log parsing

_F = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_RE = {
    "code_sha256": re.compile(r"^code_sha256: ([0-9a-f]{64})\s*$", re.M),
    "env": re.compile(r"^env: (\w+): (.*?)\s*$", re.M),
    "val": re.compile(rf"^(\d+)/(\d+) val_loss: ({_F}) val_bpb: ({_F}) train_time: ({_F})m", re.M),
    "train": re.compile(rf"^(\d+)/(\d+) train_loss: ({_F}) train_time: ({_F})m"
                        rf"(?: tok/s: ({_F}))?", re.M),
    "stop": re.compile(r"^stopping_early: (\S+) train_time: (\d+)ms step: (\d+)/(\d+)", re.M),
    "budget": re.compile(r"^training_budget: train_ms: (\d+) gptq_ms: (\d+) total_ms: (\d+)"
                         r" limit_ms: (\d+)", re.M),
    "prequant": re.compile(rf"^pre-quantization post-ema val_loss:({_F}) val_bpb:({_F})", re.M),
    "code_size": re.compile(r"^Code size: (\d+) bytes", re.M),
    "model_bytes": re.compile(r"^Serialized model (\S+): (\d+) bytes", re.M),
    "total": re.compile(r"^Total submission size(?: (\S+))?: (\d+) bytes", re.M),
    "final": re.compile(r"^final_(\w+) ((?:\w+:\S+ ?)+)\s*$", re.M),
    "peak": re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB", re.M),
    "run_id": re.compile(r"^run_id: (\S*)", re.M),
    "eval_total": re.compile(r"^eval_total: (\d+)ms\s*$", re.M),
    "eval_only": re.compile(r"^eval_only: ", re.M),
}
_RUN_START = re.compile(r"^run_id: ", re.M)
_HP_LINE = re.compile(r"  (\w+): ?(.*?)[ \t\r]*")


def _num(s: str):
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    if s.endswith("ms") and re.fullmatch(r"-?\d+ms", s):
        return int(s[:-2])
    try:
        return float(s)
    except ValueError:
        return s


def _single(name: str, text: str, required: bool = True, group: int = 1):
    vals = {m.group(group) for m in _RE[name].finditer(text)}
    if len(vals) > 1:
        raise RecordError(f"conflicting '{name}' lines: {sorted(vals)}")
    if not vals:
        if required:
            raise RecordError(f"missing required line '{name}'")
        return None
    return vals.pop()


def split_runs(text: str) -> list[str]:
    """Split a log at its ``run_id: `` lines, one segment per run (train_gpt.py appends to
    ``logs/<RUN_ID>.txt``, so a re-used RUN_ID gives several runs in one file).  Text
    before the first ``run_id:`` line belongs to the first run; a log without any such
    line is one run."""
    starts = [m.start() for m in _RUN_START.finditer(text)]
    if not starts:
        return [text]
    segs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    segs[0] = text[:starts[0]] + segs[0]
    return segs


def parse_hparams(text: str) -> dict | None:
    """The ``Hyperparameters:`` block (``  name: value`` lines) as a dict, or None."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.rstrip() == "Hyperparameters:":
            hp = {}
            for l in lines[i + 1:]:
                m = _HP_LINE.fullmatch(l)
                if not m:
                    break
                hp[m[1]] = m[2]
            return hp
    return None


def parse_log(text: str, where: str = "log") -> dict:
    """Parse one rank-0 training log (format in the module docs / brief).

    A log may hold several runs (see :func:`split_runs`); exactly one of them must be a
    training run (it has a ``training_budget:`` line) and only that one is parsed.
    EVAL_ONLY re-score runs (and runs that never reached ``training_budget``) are ignored.
    """
    try:
        segs = split_runs(text)
        train = [s_ for s_ in segs if _RE["budget"].search(s_)]
        if len(train) > 1:
            ids = [(_RE["run_id"].search(s_) or [None, "?"])[1] for s_ in train]
            raise RecordError(f"holds {len(train)} training runs (run_id {', '.join(ids)}); "
                              "give one training run per log")
        if not train:
            kinds = " (it has only EVAL_ONLY runs)" if any(_RE["eval_only"].search(s_)
                                                           for s_ in segs) else ""
            raise RecordError(f"missing required line 'training_budget: ...'{kinds}")
        text = train[0]
        rid = _RE["run_id"].search(text)
        out = {"code_sha256": _single("code_sha256", text),
               "run_id": rid[1] if rid else None, "ignored_runs": len(segs) - 1}
        hp = parse_hparams(text)
        if hp is None:
            raise RecordError("missing required 'Hyperparameters:' block")
        if not re.fullmatch(r"-?\d+", hp.get("seed", "")):
            raise RecordError("missing required line '  seed: N' (Hyperparameters block)")
        out["hparams"] = hp
        out["seed"] = int(hp["seed"])
        out["env"] = {m.group(1): m.group(2) for m in _RE["env"].finditer(text)}
        for k in ("python", "torch", "gpu", "tokenizer_sha256", "data_fingerprint"):
            if k not in out["env"]:
                raise RecordError(f"missing required line 'env: {k}: ...'")
        fp = re.match(r"[0-9a-f]+\b", out["env"]["data_fingerprint"])
        if not fp:
            raise RecordError(f"'env: data_fingerprint: {out['env']['data_fingerprint']}' does "
                              "not start with a hex digest")
        out["data_fingerprint"] = fp[0]
        out["eval_total_ms"] = int(_single("eval_total", text))
        out["val"] = [dict(step=int(m[1]), total=int(m[2]), val_loss=float(m[3]),
                           val_bpb=float(m[4]), train_time_ms=float(m[5]) * 60000.0)
                      for m in _RE["val"].finditer(text)]
        out["train"] = [dict(step=int(m[1]), total=int(m[2]), train_loss=float(m[3]),
                             train_time_ms=float(m[4]) * 60000.0,
                             tok_s=float(m[5]) if m[5] else None)
                        for m in _RE["train"].finditer(text)]
        stop = _RE["stop"].search(text)
        if stop:
            out["stop"] = dict(reason=stop[1], train_time_ms=int(stop[2]), step=int(stop[3]))
            out["steps"] = int(stop[3])
        elif out["val"]:
            out["stop"] = None
            out["steps"] = out["val"][-1]["step"]
        else:
            raise RecordError("no 'stopping_early' line and no 'step/N val_loss' line: "
                              "cannot tell the step count")
        b = _RE["budget"].findall(text)
        if not b:
            raise RecordError("missing required line 'training_budget: ...'")
        tr, gq, tot, lim = map(int, b[-1])
        out["budget"] = dict(train_ms=tr, gptq_ms=gq, total_ms=tot, limit_ms=lim)
        out["code_size"] = int(_single("code_size", text))
        tots = _RE["total"].findall(text)
        if not tots:
            raise RecordError("missing required line 'Total submission size ...: N bytes'")
        out["total_bytes"] = int(tots[-1][1])
        out["compressor"] = tots[-1][0] or None
        models = [(k, int(v)) for k, v in _RE["model_bytes"].findall(text)]
        out["model_bytes"] = models[-1][1] if models else out["total_bytes"] - out["code_size"]
        pre = _RE["prequant"].search(text)
        out["prequant"] = dict(val_loss=float(pre[1]), val_bpb=float(pre[2])) if pre else None
        finals = {}
        for m in _RE["final"].finditer(text):
            finals[m[1]] = {k: _num(v) for k, v in re.findall(r"(\w+):(\S+)", m[2])}
        out["finals"] = finals
        score = next((k for k in finals if k.endswith("sliding_window")), None) or \
            next((k for k in finals if k.endswith("roundtrip")), None)
        if score is None or "val_bpb" not in finals[score] or "val_loss" not in finals[score]:
            raise RecordError("missing required line 'final_int6_sliding_window ...' or "
                              "'final_int6_roundtrip ...' with val_loss and val_bpb")
        out["score_source"] = score
        out["val_bpb"] = float(finals[score]["val_bpb"])
        out["val_loss"] = float(finals[score]["val_loss"])
        if not (math.isfinite(out["val_bpb"]) and math.isfinite(out["val_loss"])):
            raise RecordError(f"final_{score} val_loss:{out['val_loss']} val_bpb:{out['val_bpb']} "
                              "is not finite (the run diverged)")
        peak = _RE["peak"].search(text)
        out["peak_mem_mib"] = dict(allocated=int(peak[1]), reserved=int(peak[2])) if peak else None
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None
    return out


# --------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularised incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with (possibly non-integer) ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def mean_std(xs) -> tuple[float, float | None]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def welch_ttest_less(a, b) -> dict:
    """Welch's t-test, one-sided H1: mean(a) < mean(b).  Same numbers as
    ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative="less")``."""
    if len(a) < 2 or len(b) < 2:
        return {"welch_t": None, "welch_df": None, "p_value": None}
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0.0:
        return {"welch_t": None, "welch_df": None, "p_value": None}
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return {"welch_t": t, "welch_df": df, "p_value": t_cdf(t, df)}


# --------------------------------------------------------------------------- record

def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return s or "record"


def plot_curves(runs: list[dict], path: str) -> None:
    """Train loss and val BPB against training time (minutes), one line per seed."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for r in runs:
        tr = [x for x in r["train"] if math.isfinite(x["train_loss"])]
        ax1.plot([x["train_time_ms"] / 60000 for x in tr], [x["train_loss"] for x in tr],
                 marker=".", label=f"seed {r['seed']}")
        va = [x for x in r["val"] if x["step"] > 0] or r["val"]  # step 0 (~log V) hides the rest
        ax2.plot([x["train_time_ms"] / 60000 for x in va], [x["val_bpb"] for x in va],
                 marker="o", label=f"seed {r['seed']}")
    ax1.set(xlabel="training time (min)", ylabel="train loss (nats/token)", title="train loss")
    ax2.set(xlabel="training time (min)", ylabel="val BPB", title="validation BPB (raw weights, step > 0)")
    ax1.set_yscale("log")  # the early loss spike would flatten the rest
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax1.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _fmt(x, nd=8):
    return "n/a" if x is None else f"{x:.{nd}f}"


def render_readme(sub: dict, runs: list[dict]) -> str:
    L_ = []
    L_.append(f"# {sub['name']}\n")
    std = sub["val_bpb_std"]
    L_.append(f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(runs)} seed"
              f"{'s' if len(runs) != 1 else ''}"
              + (f", sample std {std:.8f}" if std is not None else "") + ")  \n")
    L_.append(f"Author: {sub['author']}" + (f" (@{sub['github_id']})" if sub.get("github_id") else "")
              + f"  \nDate: {sub['date']}  \nTrack: {sub['track']}\n")
    L_.append("## Results\n")
    L_.append("| seed | steps | train time (ms) | val_loss | val_bpb | score line | roundtrip val_bpb "
              "| artifact bytes |")
    L_.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        rt = r["finals"].get("int6_roundtrip", {}).get("val_bpb")
        L_.append(f"| {r['seed']} | {r['steps']} | {r['budget']['train_ms']} | {r['val_loss']:.8f} "
                  f"| {r['val_bpb']:.8f} | final_{r['score_source']} | "
                  f"{_fmt(rt if isinstance(rt, float) else None)} | {r['artifact_bytes']:,} |")
    L_.append(f"| **mean** | | | {sub['val_loss']:.8f} | **{sub['val_bpb']:.8f}** | | | |\n")
    L_.append(f"The score is the `final_int6_sliding_window` line of each log (or "
              f"`final_int6_roundtrip` where sliding-window evaluation was disabled). "
              f"Optional TTT/SLOT lines are kept in `submission.json` but are not the score.\n")
    L_.append(f"Artifact size: code {sub['bytes_code']:,} bytes (`train_gpt.py`, a self-extracting "
              f"LZMA2+base85 wrapper) + compressed model; largest total {sub['bytes_total']:,} bytes "
              f"(limit {MAX_ARTIFACT_BYTES:,}).\n")
    if "delta_bpb" in sub:
        b = sub["baseline"]
        L_.append("## Comparison with the baseline\n")
        L_.append(f"Baseline{(' ' + b['ref']) if b.get('ref') else ''}: val_bpb "
                  f"{', '.join(f'{x:.8f}' for x in b['val_bpb'])} (mean {b['mean']:.8f}).\n")
        L_.append(f"- delta_bpb (mean ours - mean baseline): {sub['delta_bpb']:+.8f}")
        L_.append(f"- delta_nats: {sub['delta_nats']:+.8f} nats per byte, defined as delta_bpb x ln 2 "
                  "(a per-byte quantity, not per token, so it is not a difference of val_loss)")
        if sub.get("welch_t") is not None:
            L_.append(f"- Welch t = {sub['welch_t']:.4f}, df = {sub['welch_df']:.2f}, one-sided "
                      f"p = {sub['p_value']:.3g} (H1: our mean val_bpb is lower)\n")
        else:
            L_.append("- Welch test: not computed (needs at least two runs on each side and "
                      "non-zero variance)\n")
    L_.append("## Environment (from the logs)\n")
    for k in ("hardware", "gpu_count", "python_version", "pytorch_version", "cuda_version"):
        L_.append(f"- {k}: {sub.get(k)}")
    L_.append(f"- code_sha256 in logs: {', '.join(sorted({r['code_sha256'] for r in runs}))}\n")
    L_.append("## Files\n")
    L_.append("- `train_gpt.py`: the submitted code (run it directly; it decompresses and executes "
              "the trainer)")
    for r in runs:
        L_.append(f"- `{r['log_name']}`: log of seed {r['seed']}")
    L_.append("- `submission.json`, `train_curves.png` (train loss and val BPB against training time)\n")
    L_.append("## Reproduce\n")
    L_.append("```")
    for r in runs:
        L_.append(f"SEED={r['seed']} torchrun --standalone --nproc_per_node=8 train_gpt.py")
    L_.append("```")
    return "\n".join(L_) + "\n"


def _env_value(runs, key):
    vals = [r["env"].get(key) for r in runs]
    uniq = sorted({v for v in vals if v is not None})
    if len(uniq) > 1:
        print(f"warning: logs disagree on env {key}: {uniq}", file=sys.stderr)
    return uniq[0] if len(uniq) == 1 else (uniq or None)


def _is_previous_record(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and \
        os.path.isfile(os.path.join(path, "submission.json"))


def check_out_dir(out: str, script: str, logs: list[str], force: bool) -> None:
    """Refuse an output folder whose replacement could destroy anything but a previous record."""
    real = os.path.realpath(out)
    for what, p in [("the current directory", os.curdir), ("--script", script)] + \
            [("log", l) for l in logs]:
        rp = os.path.realpath(p)
        if os.path.commonpath([real, rp]) == real:
            raise RecordError(f"--out {out} is or contains {what} {os.path.abspath(p)}")
    if not os.path.lexists(out):
        return
    if os.path.islink(out):
        raise RecordError(f"--out {out} is a symbolic link")
    if not os.path.isdir(out):
        raise RecordError(f"--out {out} exists and is not a folder")
    if not os.listdir(out):
        return
    if not force:
        raise RecordError(f"{out} exists and is not empty (use --force to replace a previous "
                          "record folder)")
    if not _is_previous_record(out):
        raise RecordError(f"{out} is not empty and holds no submission.json, so it is not a "
                          "previous record; --force only replaces record folders")


def _replace_dir(new: str, out: str) -> None:
    """Move folder ``new`` to ``out``; an existing ``out`` is renamed aside first and deleted
    only once ``new`` is in place (restored if that fails).  ``new`` and ``out`` share a parent."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    aside_dir = tempfile.mkdtemp(prefix=".record-old-", dir=os.path.dirname(os.path.abspath(out)))
    aside = os.path.join(aside_dir, "old")
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        os.rmdir(aside_dir)
        raise
    shutil.rmtree(aside_dir, ignore_errors=True)


def _json_safe(x, where="", bad=None):
    """Non-finite floats (in optional lines such as a diverged TTT score) become None."""
    if isinstance(x, float) and not math.isfinite(x):
        if bad is not None:
            bad.append(where)
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v, f"{where}.{k}" if where else str(k), bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]", bad) for i, v in enumerate(x)]
    return x


def check_runs_consistent(runs: list[dict]) -> None:
    """Cross-log checks: same tokenizer, data, hyperparameters and score line; eval time."""
    for label, get in [("tokenizer_sha256", lambda r: r["env"]["tokenizer_sha256"]),
                       ("data_fingerprint", lambda r: r["data_fingerprint"])]:
        if len({get(r) for r in runs}) > 1:
            raise RecordError(f"logs disagree on {label}: " + ", ".join(
                f"{r['path']}={get(r)[:16]}..." for r in runs))
    ref = runs[0]["hparams"]
    differ = set()
    for r in runs[1:]:
        for k in set(ref) | set(r["hparams"]):
            if k not in HPARAMS_MAY_DIFFER and ref.get(k) != r["hparams"].get(k):
                differ.add(k)
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"{r['path']}={r['hparams'].get(k, '<missing>')}"
                                                  for r in runs) for k in sorted(differ))
        raise RecordError(f"logs differ in hyperparameters {', '.join(sorted(differ))} ({detail})")
    for r in runs:
        if r["eval_total_ms"] > MAX_EVAL_MS:
            raise RecordError(f"{r['path']}: eval_total {r['eval_total_ms']} ms exceeds the "
                              f"evaluation limit of {MAX_EVAL_MS} ms")
    sources = {r["score_source"] for r in runs}
    if len(sources) > 1:
        raise RecordError("seeds are scored by different lines (all must use the same one): "
                          + ", ".join(f"{r['path']}=final_{r['score_source']}" for r in runs))


def assemble_record(logs: list[str], name: str, author: str, script: str = "train_gpt.py",
                    github_id: str | None = None, baseline_bpb: list[float] | None = None,
                    baseline_ref: str | None = None, track: str = DEFAULT_TRACK,
                    out: str | None = None, date: str | None = None, strip: bool = False,
                    force: bool = False) -> tuple[str, dict]:
    """Validate the logs and write a record folder; return (out_dir, submission dict).

    All checks run before anything is written; the folder is built in a temporary
    directory and renamed into place, so a refusal leaves no files behind.
    """
    if not logs:
        raise RecordError("no logs given")
    date = date or _dt.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise RecordError(f"date must be YYYY-MM-DD, got {date!r}")
    out = out or os.path.join("records", f"{date}_{_slug(name)}")
    check_out_dir(out, script, logs, force)
    if baseline_bpb is not None:
        baseline_bpb = [float(x) for x in baseline_bpb]
        if not all(math.isfinite(x) for x in baseline_bpb):
            raise RecordError(f"baseline val_bpb values must be finite: {baseline_bpb}")

    with open(script, "rb") as f:
        script_bytes = f.read()
    script_text = script_bytes.decode("utf-8-sig")
    try:  # an already-built wrapper is shipped verbatim
        source = extract_source(script_text)
        wrapper = script_text
        print(f"{script} is already a wrapper; shipping it as is")
    except WrapperError:
        source = script_text
        wrapper = make_wrapper(source, strip=strip)
    wrapper_bytes = wrapper.encode("utf-8")
    accepted = {_sha256(script_bytes): len(script_bytes),
                _sha256(wrapper_bytes): len(wrapper_bytes),
                _sha256(source.encode("utf-8")): len(source.encode("utf-8"))}

    runs = []
    for path in logs:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            r = parse_log(f.read(), where=path)
        r["path"] = path
        runs.append(r)

    hashes = {r["code_sha256"] for r in runs}
    if len(hashes) > 1:
        raise RecordError("logs ran different code: " + ", ".join(
            f"{r['path']}={r['code_sha256'][:12]}" for r in runs))
    h = hashes.pop()
    if h not in accepted:
        raise RecordError(f"log code_sha256 {h[:12]}... matches neither {script} "
                          f"({_sha256(source.encode())[:12]}...) nor its wrapper "
                          f"({_sha256(wrapper_bytes)[:12]}...)")
    seeds = [r["seed"] for r in runs]
    dups = sorted({s for s in seeds if seeds.count(s) > 1})
    if dups:
        raise RecordError(f"duplicate seeds: {dups}")
    for r in runs:
        if r["code_size"] != accepted[h]:
            raise RecordError(f"{r['path']}: 'Code size: {r['code_size']}' does not match the "
                              f"{accepted[h]} bytes of the file with that sha256")
        if r["total_bytes"] > MAX_ARTIFACT_BYTES:
            raise RecordError(f"{r['path']}: artifact {r['total_bytes']:,} bytes exceeds "
                              f"{MAX_ARTIFACT_BYTES:,}")
        r["artifact_bytes"] = r["model_bytes"] + len(wrapper_bytes)
        if r["artifact_bytes"] > MAX_ARTIFACT_BYTES:
            raise RecordError(f"{r['path']}: model {r['model_bytes']:,} + wrapper "
                              f"{len(wrapper_bytes):,} bytes exceeds {MAX_ARTIFACT_BYTES:,}")
        b = r["budget"]
        if b["total_ms"] > MAX_TRAIN_MS or b["train_ms"] > MAX_TRAIN_MS or \
                (r["stop"] and r["stop"]["train_time_ms"] > MAX_TRAIN_MS):
            raise RecordError(f"{r['path']}: training took {b['total_ms']} ms "
                              f"(train {b['train_ms']} + gptq {b['gptq_ms']}), over {MAX_TRAIN_MS}")
        r["log_name"] = f"train_seed{r['seed']}.log"
    check_runs_consistent(runs)

    bpbs = [r["val_bpb"] for r in runs]
    losses = [r["val_loss"] for r in runs]
    m_bpb, s_bpb = mean_std(bpbs)
    m_loss, _ = mean_std(losses)
    gpu = _env_value(runs, "gpu")
    gm = re.fullmatch(r"([^,]*?) x(\d+)", gpu) if isinstance(gpu, str) else None
    sub = {
        "author": author,
        "github_id": github_id,
        "name": name,
        "date": date,
        "track": track,
        "val_bpb": m_bpb,
        "val_bpb_std": s_bpb,
        "val_loss": m_loss,
        "seeds": seeds,
        "seed_results": {},
        "bytes_total": max(r["artifact_bytes"] for r in runs),
        "bytes_code": len(wrapper_bytes),
        "hardware": gpu,
        "gpu_name": gm[1] if gm else gpu,
        "gpu_count": int(gm[2]) if gm else None,
        "python_version": _env_value(runs, "python"),
        "pytorch_version": _env_value(runs, "torch"),
        "cuda_version": _env_value(runs, "cuda"),
        "code_sha256": h,
    }
    for r in runs:
        sr = {"val_bpb": r["val_bpb"], "val_loss": r["val_loss"],
              "artifact_bytes": r["artifact_bytes"], "logged_total_bytes": r["total_bytes"],
              "steps": r["steps"], "train_time_ms": r["budget"]["train_ms"],
              "total_time_ms": r["budget"]["total_ms"], "score_line": f"final_{r['score_source']}"}
        for k, v in r["finals"].items():
            if k != r["score_source"]:
                sr[f"final_{k}"] = v
        if r["prequant"]:
            sr["pre_quant_val_bpb"] = r["prequant"]["val_bpb"]
        sr["env"] = r["env"]
        sr["run_id"] = r["run_id"]
        sr["eval_total_ms"] = r["eval_total_ms"]
        sub["seed_results"][str(r["seed"])] = sr
    if baseline_bpb:
        mb, sb = mean_std(list(baseline_bpb))
        sub["baseline"] = {"ref": baseline_ref, "val_bpb": list(baseline_bpb), "mean": mb, "std": sb}
        sub["delta_bpb"] = m_bpb - mb
        sub["delta_nats"] = (m_bpb - mb) * math.log(2)
        sub["delta_nats_note"] = "delta_bpb * ln 2: nats per byte, not per token"
        sub.update(welch_ttest_less(bpbs, list(baseline_bpb)))

    bad: list[str] = []
    sub = _json_safe(sub, bad=bad)
    if bad:
        print(f"warning: non-finite values written as null: {', '.join(bad)}", file=sys.stderr)
    try:
        sub_text = json.dumps(sub, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise RecordError(f"submission.json would not be valid JSON: {e}") from None
    readme = render_readme(sub, runs)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".record-", dir=parent)
    try:
        with open(os.path.join(tmp, "train_gpt.py"), "wb") as f:
            f.write(wrapper_bytes)
        for r in runs:
            shutil.copyfile(r["path"], os.path.join(tmp, r["log_name"]))
        with open(os.path.join(tmp, "submission.json"), "w", encoding="utf-8") as f:
            f.write(sub_text)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        plot_curves(runs, os.path.join(tmp, "train_curves.png"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        check_out_dir(out, script, logs, force)  # again: it may have changed meanwhile
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, sub


# --------------------------------------------------------------------------- CLI

def _build_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="build_wrapper.py",
                                 description="Build the self-extracting train_gpt.py wrapper "
                                             "(use 'build_wrapper.py record -h' for records).")
    ap.add_argument("script", nargs="?", default="train_gpt.py", help="source to wrap")
    ap.add_argument("-o", "--out", help="output path (required unless --check-only)")
    ap.add_argument("--strip", action="store_true",
                    help="remove comments, docstrings and blank lines first (AST-verified)")
    ap.add_argument("--check-only", action="store_true",
                    help="build and verify in memory, print the report, write nothing")
    ap.add_argument("--xz-check", choices=sorted(XZ_CHECKS), default="crc64",
                    help="integrity check inside the .xz container (crc64 as in the reference; "
                         "none saves 8 payload bytes)")
    a = ap.parse_args(argv)
    if not a.out and not a.check_only:
        ap.error("-o/--out is required unless --check-only")
    try:
        with open(a.script, "rb") as f:
            src = f.read().decode("utf-8-sig")
        rep = build_wrapper(src, strip=a.strip, check=a.xz_check)
    except (OSError, UnicodeDecodeError, WrapperError) as e:
        print(f"build_wrapper: error: {e}; nothing written", file=sys.stderr)
        return 1
    print(format_report(rep))
    if a.check_only:
        print("check-only: verified, nothing written")
        return 0
    if os.path.abspath(a.out) == os.path.abspath(a.script):
        print("build_wrapper: error: refusing to overwrite the source", file=sys.stderr)
        return 1
    atomic_write(a.out, rep["wrapper"].encode("utf-8"))
    print(f"wrote {a.out} ({rep['wrapper_bytes']} bytes, sha256 "
          f"{_sha256(rep['wrapper'].encode())})")
    return 0


def _record_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="build_wrapper.py record",
                                 description="Assemble a record folder from training logs.")
    ap.add_argument("--logs", nargs="+", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id")
    ap.add_argument("--baseline-bpb", help="comma-separated per-seed val_bpb of the baseline")
    ap.add_argument("--baseline-ref", help="what the baseline is, e.g. 'PR #1019'")
    ap.add_argument("--script", default="train_gpt.py",
                    help="trainer source, or an already-built wrapper (shipped verbatim)")
    ap.add_argument("--strip", action="store_true", help="strip the source before wrapping")
    ap.add_argument("--track", default=DEFAULT_TRACK)
    ap.add_argument("--date", help="YYYY-MM-DD (default: today)")
    ap.add_argument("--out", help="output folder (default records/<date>_<name>)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    a = ap.parse_args(argv)
    try:
        base = None
        if a.baseline_bpb:
            try:
                base = [float(x) for x in a.baseline_bpb.split(",") if x.strip()]
            except ValueError:
                raise RecordError(f"--baseline-bpb must be numbers: {a.baseline_bpb!r}") from None
            if not base:  # finiteness is checked by assemble_record
                raise RecordError(f"--baseline-bpb must be numbers: {a.baseline_bpb!r}")
        out, sub = assemble_record(a.logs, a.name, a.author, script=a.script,
                                   github_id=a.github_id, baseline_bpb=base,
                                   baseline_ref=a.baseline_ref, track=a.track, out=a.out,
                                   date=a.date, strip=a.strip, force=a.force)
    except (OSError, UnicodeDecodeError, RecordError, WrapperError) as e:
        print(f"build_wrapper record: error: {e}; nothing written", file=sys.stderr)
        return 1
    std = sub["val_bpb_std"]
    print(f"wrote {out}: val_bpb {sub['val_bpb']:.8f}"
          + (f" (std {std:.8f})" if std is not None else "")
          + f", seeds {sub['seeds']}, bytes_total {sub['bytes_total']:,}, code {sub['bytes_code']:,}")
    if "delta_bpb" in sub:
        print(f"delta_bpb {sub['delta_bpb']:+.8f}, welch_t {sub['welch_t']}, p {sub['p_value']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "record":
        return _record_main(argv[1:])
    return _build_main(argv)


if __name__ == "__main__":
    sys.exit(main())
