"""Tests for build_wrapper.py: self-extracting wrapper, stripping (on by default), --no-strip."""
from __future__ import annotations

import ast
import base64
import lzma
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_wrapper as bw  # noqa: E402

SELF_SRC = (ROOT / "build_wrapper.py").read_text(encoding="utf-8")


def run_py(path, *args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # a wrapped build_wrapper imports train_gpt
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env=env)


# ----------------------------------------------------------------------------- wrapper

def test_roundtrip_on_real_source():
    rep = bw.build_wrapper(SELF_SRC, strip=False)
    w = rep["wrapper"]
    assert bw.extract_source(w) == SELF_SRC
    # decode independently of extract_source as well
    lit = ast.parse(w).body[1].value.args[0].args[0].args[0].value
    assert lzma.decompress(base64.b85decode(lit)) == SELF_SRC.encode("utf-8")
    compile(w, "w.py", "exec")
    assert w.startswith("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\"")
    assert w.endswith('")))') and not w.endswith("\n")
    lines = w.split("\n")
    assert max(len(l) for l in lines) <= 100
    assert all(len(l) == 100 for l in lines[1:-1])  # lines are filled
    assert rep["wrapper_bytes"] == len(w.encode()) < len(SELF_SRC.encode()) / 2
    assert rep["payload_bytes"] < rep["b85_chars"] <= math.ceil(rep["payload_bytes"] / 4) * 5
    assert rep["compression"].startswith("xz check=crc64")


def test_compress_payload_is_smallest_and_plain_decodable():
    data = SELF_SRC.encode()
    blob, desc = bw.compress_payload(data)
    assert blob[:6] == b"\xfd7zXZ\x00"  # .xz container magic
    assert lzma.decompress(blob) == data
    sizes = {p: len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=p))
             for p in (6, 9, 9 | lzma.PRESET_EXTREME)}
    assert len(blob) == min(sizes.values())
    assert desc.startswith("xz check=crc64 lzma2 preset=9")
    none, _ = bw.compress_payload(data, check="none")
    assert len(none) == len(blob) - 8 and lzma.decompress(none) == data


def test_base85_alphabet_is_string_safe():
    sample = base64.b85encode(bytes(range(256)) * 8 + os.urandom(4096))
    assert set(sample) <= set(bw.B85_ALPHABET)
    assert len(set(bw.B85_ALPHABET)) == 85
    for bad in b"\"'\\ \t\n\r":
        assert bad not in bw.B85_ALPHABET


@pytest.mark.parametrize("n", [0, 1, 67, 68, 69, 70, 71, 98, 165, 166, 167, 168, 300, 1000])
def test_layout_edge_lengths(n):
    b85 = ("0123456789" * 200)[:n]
    w = bw._layout(b85)
    assert max(len(l) for l in w.split("\n")) <= 100
    lit = ast.parse(w).body[1].value.args[0].args[0].args[0]
    assert lit.value == b85


def test_cli_writes_verified_file(tmp_path, capsys):
    src = tmp_path / "mod.py"
    src.write_text(SELF_SRC)
    out = tmp_path / "out" / "train_gpt.py"
    assert bw.main([str(src), "-o", str(out)]) == 0  # stripped by default
    text = out.read_text()
    assert bw.extract_source(text) == bw.strip_source(SELF_SRC)
    rep = capsys.readouterr().out
    assert f"source bytes: {len(SELF_SRC.encode())}" in rep
    assert f"stripped bytes: {len(bw.strip_source(SELF_SRC).encode())}" in rep
    assert f"wrapper bytes: {out.stat().st_size}" in rep
    assert "compression: xz" in rep
    assert [p.name for p in out.parent.iterdir()] == ["train_gpt.py"]  # no temporary left
    plain = tmp_path / "plain.py"
    assert bw.main([str(src), "-o", str(plain), "--no-strip"]) == 0
    assert bw.extract_source(plain.read_text()) == SELF_SRC
    assert out.stat().st_size < plain.stat().st_size
    assert "stripped bytes" not in capsys.readouterr().out


def test_check_only_writes_nothing(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(SELF_SRC)
    assert bw.main([str(src), "--check-only"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mod.py"]


@pytest.mark.parametrize("mode", ["altered", "garbage", "b85"])
def test_refuses_to_write_on_mismatch(tmp_path, monkeypatch, capsys, mode):
    src = tmp_path / "mod.py"
    src.write_text("print('hello')\n" * 50)
    out = tmp_path / "train_gpt.py"
    real = bw.compress_payload
    if mode == "altered":  # decodes fine but to different bytes
        monkeypatch.setattr(bw, "compress_payload",
                            lambda data, check="crc64": real(data + b"#x\n", check))
    elif mode == "garbage":
        monkeypatch.setattr(bw, "compress_payload",
                            lambda data, check="crc64": (real(data, check)[0][:-9] + b"\0" * 9, "x"))
    else:  # the decoder side: verification decodes with a corrupted b85decode
        real_dec = base64.b85decode
        monkeypatch.setattr(bw.base64, "b85decode", lambda s: real_dec(s)[:-1] + b"\0")
    assert bw.main([str(src), "-o", str(out)]) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mod.py"]
    err = capsys.readouterr().err
    assert "nothing written" in err
    assert ("mismatch" in err) if mode == "altered" else ("does not decode" in err)


def test_extract_source_rejects_other_shapes():
    good = bw.make_wrapper("x = 1\n")
    assert bw.extract_source(good) == "x = 1\n"
    for bad in [good.replace("b85decode", "a85decode"), good.replace("import lzma as L,", "import "),
                good + "\nprint(1)", "exec(1)", good.replace('"', "'", 1)]:
        with pytest.raises(bw.WrapperError):
            bw.extract_source(bad)


def test_wrapper_size_seen_by_wrapped_script(tmp_path):
    src = "import os\n" + "# padding comment that compresses well\n" * 200 + textwrap.dedent("""
        print(os.path.getsize(__file__))
        print(__name__)
        print(os.path.basename(__file__))
    """)
    w = tmp_path / "train_gpt.py"
    w.write_text(bw.make_wrapper(src))
    r = run_py(w)
    assert r.returncode == 0, r.stderr
    size, name, base = r.stdout.split()
    assert int(size) == w.stat().st_size == len(w.read_bytes())
    assert int(size) < len(src)
    assert (name, base) == ("__main__", "train_gpt.py")


# ----------------------------------------------------------------------------- strip

TRICKY = '''\
#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring with a # hash and 'quotes'."""
from __future__ import annotations
import sys
X = "a # not a comment"  # real comment
Y = f"{X!r:>30} # {len(X)} {'#'}"  # comment after an f-string
Z = """multi
line with trailing spaces   
# still inside the string

"""  # after the string
B = b"bytes # not comment"


def outer(a, b=2):
    """Outer doc.

    More lines.
    """
    # a comment line

    def inner(c):
        'single-quoted inner doc'
        return c * 2  # trailing
    total = a + \\
        b
    return inner(total)


class Only:
    """Only a docstring."""


class Semi:
    "doc"; value = 3


class Impl:
    """Doc"""
    def method(self):
        """Method doc""" ; return "m"


def only_doc():
    """doc only"""


async def coro():
    """async doc"""
    return 1


def not_doc():
    x = 1
    "this string is not a docstring"
    return x


def uni():
    """ünïcödé docstring → removed"""
    return "ü → kept"


print(X, Y, repr(Z), B, outer(1), Only.__name__, Semi.value, Impl().method(), only_doc(), not_doc())
print(uni(), "\\\\n escaped", r"raw \\d", {"k": [1, 2]}["k"][1])
'''


def test_strip_ast_equivalent_and_smaller():
    s = bw.strip_source(TRICKY)
    assert ast.dump(ast.parse(s)) == ast.dump(bw.remove_docstrings(ast.parse(TRICKY)))
    assert len(s) < len(TRICKY) * 0.8
    for gone in ("Module docstring", "real comment", "comment after", "a comment line",
                 "Outer doc", "inner doc", "Only a docstring", "doc only", "async doc",
                 "Method doc", "#!/usr/bin", "coding", "removed"):
        assert gone not in s, gone
    for kept in ("a # not a comment", "# {len(X)} {'#'}", "line with trailing spaces   \n",
                 "# still inside the string\n\n", "this string is not a docstring",
                 "bytes # not comment", "+ \\\n", "ü → kept"):
        assert kept in s, kept
    assert "\n\n" not in s.replace('# still inside the string\n\n"""', "")
    ns_a, ns_b = {}, {}
    # only-docstring bodies became `pass`; still valid and runnable
    exec(compile(s.replace("print(", "(lambda *a: None)("), "s", "exec"), ns_b)
    exec(compile(TRICKY.replace("print(", "(lambda *a: None)("), "t", "exec"), ns_a)
    assert ns_a["Z"] == ns_b["Z"] and ns_a["Y"] == ns_b["Y"]
    assert ns_b["Only"].__doc__ is None and ns_b["only_doc"]() is None


def test_stripped_wrapped_script_prints_same_output(tmp_path):
    orig = tmp_path / "orig.py"
    orig.write_text(TRICKY, encoding="utf-8")
    wrapped = tmp_path / "wrapped.py"
    assert bw.main([str(orig), "-o", str(wrapped)]) == 0
    assert bw.extract_source(wrapped.read_text()) == bw.strip_source(TRICKY)
    a, b = run_py(orig), run_py(wrapped)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout and "a # not a comment" in a.stdout


def test_strip_self_and_run_stripped_tool(tmp_path):
    """The stripped, wrapped build_wrapper.py builds the same wrapper as the original."""
    s = bw.strip_source(SELF_SRC)
    assert ast.dump(ast.parse(s)) == ast.dump(bw.remove_docstrings(ast.parse(SELF_SRC)))
    tool = tmp_path / "bw_wrapped.py"
    tool.write_text(bw.make_wrapper(SELF_SRC, strip=True))
    target = tmp_path / "t.py"
    target.write_text(TRICKY, encoding="utf-8")
    r = run_py(tool, target, "-o", tmp_path / "o.py")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.py").read_text() == bw.make_wrapper(TRICKY, strip=True)
    r = run_py(tool, target, "-o", tmp_path / "p.py", "--no-strip")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.py").read_text() == bw.make_wrapper(TRICKY, strip=False)


def test_strip_only_docstring_bodies_get_pass():
    src = 'def f():\n    """only"""\nclass C:\n    "x"\nif True:\n    "not a docstring"\n'
    s = bw.strip_source(src)
    assert s == 'def f():\n pass\nclass C:\n pass\nif True:\n "not a docstring"\n'


def test_strip_reindents_safely():
    src = ('if True:\n\tif 1:\n\t\tx = [1,\n\t\t     2]  # c\n\t\ty = "a\\\n    b"\n'
           '\t\tz = \\\n\t\t\t3\n\t\tw = (\n\t\t\"\"\"\n\t   keep\n\t\"\"\")\n'
           '\telse:\n\t\tpass\nprint(x, y, z, repr(w))\n')
    s = bw.strip_source(src)
    assert s == ('if True:\n if 1:\n  x = [1,\n 2]\n  y = "a\\\n    b"\n  z = \\\n 3\n'
                 '  w = (\n \"\"\"\n\t   keep\n\t\"\"\")\n else:\n  pass\nprint(x, y, z, repr(w))\n')
    ns_a, ns_b = {"print": lambda *a: None}, {"print": lambda *a: None}
    exec(src, ns_a)
    exec(s, ns_b)
    assert [ns_a[k] for k in "xyzw"] == [ns_b[k] for k in "xyzw"]


def test_strip_refuses_non_equivalent(monkeypatch):
    monkeypatch.setattr(bw, "_strip_once", lambda src: src.replace("x = 1", "x = 2"))
    with pytest.raises(bw.StripError, match="AST"):
        bw.strip_source("x = 1\n")
    with pytest.raises(bw.StripError, match="__doc__"):
        bw.strip_source('"""d"""\nprint(__doc__)\n')


ODD_SRC = ('x = "a\x0cb\x1cc\x1dd\x1ee\x85f\u2028g\u2029h\x0bi"  # c\u2028omment\n'
           '\x0cdef f():\n    """doc \u2028 with sep"""\n    return "\u2028"  # tail \x85\n'
           'y = """multi\x0c\nline\u2028\n"""\n')


def test_strip_only_splits_on_newline():
    s = bw.strip_source(ODD_SRC)
    ns_a, ns_b = {}, {}
    exec(ODD_SRC, ns_a)
    exec(s, ns_b)
    assert (ns_b["x"], ns_b["y"], ns_b["f"]()) == (ns_a["x"], ns_a["y"], ns_a["f"]())
    assert "omment" not in s and "doc" not in s and "tail" not in s
    assert bw.split_lines("a\u2028b\x0cc\nd\n") == ["a\u2028b\x0cc\n", "d\n"]
    assert bw.split_lines("a\n\nb") == ["a\n", "\n", "b"] and bw.split_lines("") == []


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import build_wrapper, sys; "
                        "print('matplotlib' in sys.modules or 'torch' in sys.modules)"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False" and r.stderr == ""


def test_bom_source_is_decoded(tmp_path):
    src = tmp_path / "bom.py"
    src.write_bytes(b"\xef\xbb\xbf" + "print('hi')  # c\n".encode())
    out = tmp_path / "w.py"
    assert bw.main([str(src), "-o", str(out)]) == 0
    assert bw.extract_source(out.read_text()) == "print('hi')\n"
    r = run_py(out)
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
