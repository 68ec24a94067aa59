#!/usr/bin/env python3
"""Build the self-extracting train_gpt.py wrapper (spec 4.7); record folders: make_record.py.

    python build_wrapper.py [train_gpt.py] -o OUT/train_gpt.py [--no-strip] [--check-only]

The source, stripped of comments, docstrings and blank lines (AST-verified; --no-strip keeps
them), is compressed as .xz/LZMA2 (preset 9 or 9|extreme, the smaller), base85-encoded and
written as ``import lzma as L,base64 as B`` + ``exec(L.decompress(B.b85decode("..." "...")))``:
lines <= 100 characters, no trailing newline.  The code runs in the wrapper's namespace, so
``__file__`` (and the trainer's code size) is the wrapper.  The payload is decoded back and
compared with the intended source before anything is written; on a mismatch nothing is.
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import lzma
import os
import re
import sys
import token as _token
import tokenize
from pathlib import Path

MAX_LINE = 100  # characters per wrapper line
HEADER = "import lzma as L,base64 as B\n"
CALL_OPEN = "exec(L.decompress(B.b85decode("
CALL_CLOSE = ")))"
B85_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
XZ_CHECKS = {"crc64": lzma.CHECK_CRC64, "crc32": lzma.CHECK_CRC32, "none": lzma.CHECK_NONE}
PRESETS = {"9": 9, "9e": 9 | lzma.PRESET_EXTREME}

class WrapperError(RuntimeError):
    """The wrapper could not be built or did not decode back to the source."""

class StripError(WrapperError):
    """Stripping comments/docstrings would change the program."""

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

def split_lines(src: str) -> list[str]:
    """Lines with their ends, split on "\n" only, like tokenize (unlike ``str.splitlines``)."""
    parts = src.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])

def _tokens(src: str):
    return tokenize.generate_tokens(io.StringIO(src).readline)

def _string_rows(src: str) -> tuple[set[int], set[int]]:
    """Rows whose start / whose end lies inside a multi-line string (f-strings included)."""
    head: set[int] = set()
    tail: set[int] = set()

    def span(r0, r1):
        head.update(range(r0 + 1, r1 + 1))
        tail.update(range(r0, r1))
    fstart, fend = getattr(_token, "FSTRING_START", None), getattr(_token, "FSTRING_END", None)
    stack = []
    for tok in _tokens(src):
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
    for tok in _tokens(src):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            at_start = True
        elif tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER) and at_start:
            depths[tok.start[0]] = depth
            at_start = False
    return depths

def _strip_once(src: str) -> str:
    lines = split_lines(src)
    offs = [0]
    for line in lines:
        offs.append(offs[-1] + len(line))

    def char_offset(lineno: int, byte_col: int) -> int:  # ast columns are UTF-8 byte offsets
        return offs[lineno - 1] + len(lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8"))

    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in character offsets
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, _DOC_OWNERS) and node.body and _is_docstring_node(node.body[0]):
            doc = node.body[0]
            end = char_offset(doc.end_lineno, doc.end_col_offset)
            m = re.compile(r"[ \t]*;[ \t]*").match(src, end)  # `"""doc"""; x = 1`
            edits.append((char_offset(doc.lineno, doc.col_offset), m.end() if m else end,
                          "pass" if len(node.body) == 1 else ""))
    for tok in _tokens(src):
        if tok.type == tokenize.COMMENT:
            edits.append((offs[tok.start[0] - 1] + tok.start[1], offs[tok.end[0] - 1] + tok.end[1], ""))
    out, pos = [], 0
    for s, e, rep in sorted(edits):
        if s < pos:
            raise StripError(f"overlapping edits at offset {s}")
        out += [src[pos:s], rep]
        pos = e
    text = "".join(out) + src[pos:]
    # One space per block level, continuation lines squeezed to one space, no trailing
    # whitespace or blank lines -- never inside multi-line strings.
    head, tail = _string_rows(text)
    depths = _logical_line_depths(text)
    result = []
    for i, line in enumerate(split_lines(text), start=1):
        if i in head:
            result.append(line)
            continue
        body = line.lstrip(" \t")
        if i in depths:
            body = " " * depths[i] + body
        elif body != line:
            body = " " + body
        if i in tail:
            result.append(body)
        elif body.strip():
            result.append(body.rstrip() + "\n")
    return "".join(result)

def strip_source(src: str) -> str:
    """Remove comments, docstrings, blank lines and trailing whitespace; indent 1 space/level.

    Verified: ``ast.dump`` of the result must equal that of the original minus its
    docstrings, else :class:`StripError`; a source that reads ``__doc__`` is refused.
    """
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise StripError(f"source does not parse: {e}") from None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "__doc__") or \
                (isinstance(node, ast.Attribute) and node.attr == "__doc__"):
            raise StripError(f"source reads __doc__ (line {node.lineno}); stripping docstrings "
                             "would change behaviour (use --no-strip)")
    expected = ast.dump(remove_docstrings(tree))
    out = _strip_once(src)
    try:
        got = ast.dump(ast.parse(out))
    except SyntaxError as e:
        raise StripError(f"stripped source does not parse: {e}") from None
    if got != expected:
        raise StripError("stripped source is not AST-equivalent to the original (minus docstrings)")
    return out

# --------------------------------------------------------------------------- wrapper

def compress_payload(data: bytes, check: str = "crc64") -> tuple[bytes, str]:
    """The smaller of .xz/LZMA2 preset 9 and 9|extreme; (blob, description)."""
    blob, name = min((lzma.compress(data, format=lzma.FORMAT_XZ, check=XZ_CHECKS[check],
                                    preset=p), n) for n, p in PRESETS.items())
    return blob, f"xz check={check} lzma2 preset={name}"

def _layout(b85: str, max_line: int = MAX_LINE) -> str:
    """Adjacent string literals filling lines of at most ``max_line`` characters."""
    lines, pos, prefix = [], 0, CALL_OPEN
    while True:
        chunk = b85[pos:pos + max_line - len(prefix) - 2]
        pos += len(chunk)
        lines.append(f'{prefix}"{chunk}"')
        if pos >= len(b85):
            if len(lines[-1]) + len(CALL_CLOSE) <= max_line:
                lines[-1] += CALL_CLOSE
            else:
                lines.append(CALL_CLOSE)
            return HEADER + "\n".join(lines)  # no trailing newline: one byte less
        prefix = ""

def extract_source(wrapper_text: str) -> str:
    """The source a wrapper executes; :class:`WrapperError` unless it has the exact shape."""
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
        if not (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
                and ast.unparse(node.func) == func_src):
            raise WrapperError(f"wrapper does not call {func_src}(...) where expected")
        return node.args[0]
    if not isinstance(stmt, ast.Expr):
        raise WrapperError("wrapper statement 2 is not an expression")
    lit = call(call(call(stmt.value, "exec"), "L.decompress"), "B.b85decode")
    if not (isinstance(lit, ast.Constant) and isinstance(lit.value, str)):
        raise WrapperError("b85decode argument is not a string literal")
    if not set(lit.value) <= set(B85_ALPHABET.decode()):
        raise WrapperError("payload literal contains characters outside the base85 alphabet")
    try:
        return lzma.decompress(base64.b85decode(lit.value)).decode("utf-8")
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
    got, want = extract_source(wrapper_text).encode("utf-8"), intended.encode("utf-8")
    if got != want:
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise WrapperError(f"payload mismatch: decoded {len(got)} bytes, intended {len(want)} "
                           f"bytes, first difference at byte {n}")

def build_wrapper(src: str, strip: bool = True, check: str = "crc64") -> dict:
    """Build and verify a wrapper; return a report dict (``wrapper`` holds the text)."""
    code = strip_source(src) if strip else src
    try:
        compile(code, "<source>", "exec")
    except SyntaxError as e:
        raise WrapperError(f"source does not compile: {e}") from None
    payload, desc = compress_payload(code.encode("utf-8"), check=check)
    b85 = base64.b85encode(payload).decode("ascii")
    wrapper = _layout(b85)
    verify_wrapper(wrapper, code)
    return {"wrapper": wrapper, "code": code, "source_bytes": len(src.encode("utf-8")),
            "stripped_bytes": len(code.encode("utf-8")) if strip else None,
            "payload_bytes": len(payload), "b85_chars": len(b85),
            "wrapper_bytes": len(wrapper.encode("utf-8")), "compression": desc}

def make_wrapper(src: str, strip: bool = True, check: str = "crc64") -> str:
    """The verified self-extracting wrapper text for ``src``."""
    return build_wrapper(src, strip=strip, check=check)["wrapper"]

def format_report(rep: dict) -> str:
    rows = [("source bytes", rep["source_bytes"]), ("stripped bytes", rep["stripped_bytes"]),
            ("payload bytes (xz)", rep["payload_bytes"]), ("base85 chars", rep["b85_chars"]),
            ("wrapper bytes", rep["wrapper_bytes"]), ("compression", rep["compression"])]
    return "\n".join(f"{k:>20}: {v}" for k, v in rows if v is not None)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="build_wrapper.py", description="Build the self-extracting "
                                 "train_gpt.py wrapper (record folders: make_record.py).")
    ap.add_argument("script", nargs="?", default="train_gpt.py", help="source to wrap")
    ap.add_argument("-o", "--out", help="output path (required unless --check-only)")
    ap.add_argument("--no-strip", action="store_true", help="keep comments, docstrings, blank lines")
    ap.add_argument("--check-only", action="store_true", help="build and verify, write nothing")
    ap.add_argument("--xz-check", choices=sorted(XZ_CHECKS), default="crc64",
                    help="integrity check in the .xz container (none saves 8 payload bytes)")
    a = ap.parse_args(argv)
    if not a.out and not a.check_only:
        ap.error("-o/--out is required unless --check-only")
    try:
        src = Path(a.script).read_bytes().decode("utf-8-sig")
        rep = build_wrapper(src, strip=not a.no_strip, check=a.xz_check)
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
    from train_gpt import write_atomic  # imports torch: only when writing
    data = rep["wrapper"].encode("utf-8")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(a.out), data)
    print(f"wrote {a.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
