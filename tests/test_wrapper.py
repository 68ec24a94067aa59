"""Tests for build_wrapper.py: self-extracting wrapper, --strip, record assembly."""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_wrapper as bw  # noqa: E402

SELF_SRC = (ROOT / "build_wrapper.py").read_text(encoding="utf-8")


def run_py(path, *args, cwd=None):
    r = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=120)
    return r


# ----------------------------------------------------------------------------- wrapper

def test_roundtrip_on_real_source():
    rep = bw.build_wrapper(SELF_SRC)
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
    for p in (6, 9, 9 | lzma.PRESET_EXTREME):
        assert len(blob) <= len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=p))
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
    assert bw.main([str(src), "-o", str(out)]) == 0
    text = out.read_text()
    assert bw.extract_source(text) == SELF_SRC
    rep = capsys.readouterr().out
    assert f"source bytes: {len(SELF_SRC.encode())}" in rep
    assert f"wrapper bytes: {out.stat().st_size}" in rep
    assert "compression: xz" in rep
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


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
    assert bw.main([str(orig), "-o", str(wrapped), "--strip"]) == 0
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
    r = run_py(tool, target, "-o", tmp_path / "o.py", "--strip")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.py").read_text() == bw.make_wrapper(TRICKY, strip=True)


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


# ----------------------------------------------------------------------------- record

SCRIPT_SRC = "import os\n" + "\n".join(f"def f{i}():\n    return {i} * os.getpid()\n"
                                         for i in range(60))


TOK_SHA = "1f" * 32
DATA_FP = "2e" * 32


def hparams_lines(seed, run_id, hp=None, eval_only=""):
    """A Hyperparameters block as train_gpt.py logs it; ``hp`` overrides (None drops a name)."""
    d = {"data_dir": "./data/", "train_files": "./data/fineweb_train_*.bin",
         "val_files": "./data/fineweb_val_*.bin", "tokenizer_path": "./data/tok.model",
         "seed": seed, "run_id": run_id, "rank": 0, "world_size": 8, "local_rank": 0,
         "eval_only": eval_only, "dump_token_nll": "", "out_dir": f"./out_{run_id}",
         "train_seq_len": 2048, "num_layers": 11, "matrix_lr": 0.025}
    d.update(hp or {})
    return ["Hyperparameters:"] + [f"  {k}: {v}" for k, v in d.items() if v is not None]


def env_lines(tok_sha=TOK_SHA, data_fp=DATA_FP):
    L = []
    for k, v in [("python", "3.12.3"), ("torch", "2.11.0+cu130"), ("cuda", "13.0"),
                 ("cudnn", "91002"), ("nccl", "2.27.7"), ("gpu", "NVIDIA H100 80GB HBM3 x8"),
                 ("attention_backend", "cudnn"), ("compile", "True"), ("git_commit", "abc1234"),
                 ("tokenizer", "./data/tok.model"), ("tokenizer_sha256", tok_sha),
                 ("data_fingerprint", f"{data_fp} (train_shards: 80 val_shards: 1)")]:
        L.append(f"env: {k}: {v}")
    return L


def make_eval_only_log(seed, bpb, loss, *, code_sha, code_size, model_bytes=15_960_000,
                       run_id="rescore", eval_total_ms=80_000):
    """An EVAL_ONLY re-score run: no training_budget line, its own final_* lines."""
    L = [f"run_id: {run_id} started: 2026-11-24T11:00:00+00:00", f"code_sha256: {code_sha}"]
    L += env_lines()
    L += hparams_lines(seed, run_id, eval_only="./final_model.int6.ptz")
    L.append("eval_only: ./final_model.int6.ptz model config from the artifact: {'num_layers': 11}")
    L.append(f"Serialized model int6+brotli: {model_bytes} bytes")
    L.append(f"Code size: {code_size} bytes")
    L.append(f"Total submission size int6+brotli: {model_bytes + code_size} bytes")
    L.append(f"final_int6_roundtrip val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:7000ms")
    L.append(f"final_int6_sliding_window val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:70000ms")
    L.append(f"eval_total: {eval_total_ms}ms")
    return "\n".join(L) + "\n"


def make_log(seed, bpb, loss, *, code_sha, code_size, model_bytes=15_960_000, total_ms=599_526,
             train_ms=590_026, stop=True, sliding=True, ttt=False, extra=True, steps=5453,
             run_id=None, eval_total_ms=95_000, tok_sha=TOK_SHA, data_fp=DATA_FP, hp=None,
             ttt_bpb="1.33603200"):
    total = model_bytes + code_size
    run_id = run_id or f"run_seed{seed}"
    L = []
    if extra:
        L.append("W1124 torchrun: OMP_NUM_THREADS set to 1")
    L.append(f"run_id: {run_id} started: 2026-11-24T10:00:00+00:00")
    L.append(f"code_sha256: {code_sha}")
    L += env_lines(tok_sha, data_fp)
    L += hparams_lines(seed, run_id, hp)
    L.append("0/20000 val_loss: 8.3187 val_bpb: 3.6150 train_time: 0.00m")
    for step, tl, tm in [(1, 8.319, 0.01), (2, 12.15, 0.02), (500, 3.1234 + seed * 1e-5, 0.83),
                         (1000, 2.9, 1.66), (4000, 2.7, 6.64)]:
        L.append(f"{step}/20000 train_loss: {tl:.4f} train_time: {tm:.2f}m tok/s: 7980000")
    if extra:
        L.append("    log(f\"{step}/{n} val_loss: {x:.4f}\")  # source dump line")
    L.append("4000/20000 val_loss: 2.6400 val_bpb: 1.1478 train_time: 6.64m")
    if stop:
        L.append(f"stopping_early: wallclock_cap train_time: {train_ms}ms step: {steps}/20000")
    L.append(f"{steps}/20000 val_loss: 2.5300 val_bpb: {bpb + 0.008:.4f} train_time: "
             f"{train_ms / 60000:.2f}m")
    L.append("peak memory allocated: 30120 MiB reserved: 30154 MiB")
    L.append(f"training_budget: train_ms: {train_ms} gptq_ms: {total_ms - train_ms} "
             f"total_ms: {total_ms} limit_ms: 600000")
    L.append(f"pre-quantization post-ema val_loss:{loss + 0.016:.8f} val_bpb:{bpb + 0.007:.8f} "
             "eval_time:2010ms")
    L.append("Serialized model: 132406149 bytes")
    L.append(f"Code size: {code_size} bytes")
    L.append(f"Serialized model int6+brotli: {model_bytes} bytes")
    L.append(f"Total submission size int6+brotli: {total} bytes")
    L.append(f"final_int6_roundtrip val_loss:{loss + 0.04:.8f} val_bpb:{bpb + 0.0186:.8f} "
             "eval_time:7776ms")
    if sliding:
        L.append(f"final_int6_sliding_window val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
                 "eval_time:76195ms")
    if ttt:
        L.append(f"final_int6_ttt val_loss:3.07000000 val_bpb:{ttt_bpb} eval_time:405410ms")
    L.append(f"eval_total: {eval_total_ms}ms")
    return "\n".join(L) + "\n"


@pytest.fixture
def rec(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT_SRC)
    wrapper = bw.make_wrapper(SCRIPT_SRC)
    sha = hashlib.sha256(wrapper.encode()).hexdigest()

    class R:
        pass
    r = R()
    r.tmp, r.script, r.wrapper, r.sha, r.size = tmp_path, script, wrapper, sha, len(wrapper.encode())
    r.seeds = [42, 314, 999]
    r.bpbs = [1.08938974, 1.08982552, 1.08993367]
    r.losses = [2.50671564, 2.50771838, 2.50796723]
    r.base = [1.1147, 1.1151, 1.1140]

    def write_logs(overrides=None, seeds=None):
        paths = []
        for i, (s, b, l) in enumerate(zip(seeds or r.seeds, r.bpbs, r.losses)):
            kw = dict(code_sha=sha, code_size=r.size, ttt=(i == 0))
            kw.update((overrides or {}).get(i, {}))
            p = tmp_path / f"log_{i}.txt"
            p.write_text(make_log(s, b, l, **kw))
            paths.append(str(p))
        return paths
    r.write_logs = write_logs
    r.out = tmp_path / "records" / "2026-11-24_test"

    def run(logs, *extra):
        return bw.main(["record", "--logs", *logs, "--name", "Test record", "--author", "Ann",
                        "--github-id", "ann", "--script", str(script), "--date", "2026-11-24",
                        "--baseline-bpb", ",".join(map(str, r.base)), "--out", str(r.out), *extra])
    r.run = run
    return r


def test_record_assembly(rec):
    from scipy import stats
    assert rec.run(rec.write_logs()) == 0
    files = sorted(p.name for p in rec.out.iterdir())
    assert files == ["README.md", "submission.json", "train_curves.png", "train_gpt.py",
                     "train_seed314.log", "train_seed42.log", "train_seed999.log"]
    assert (rec.out / "train_gpt.py").read_text() == rec.wrapper
    assert (rec.out / "train_seed314.log").read_text() == (rec.tmp / "log_1.txt").read_text()
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["author"] == "Ann" and sub["github_id"] == "ann" and sub["name"] == "Test record"
    assert sub["date"] == "2026-11-24" and sub["track"] == "10min_16mb"
    assert sub["seeds"] == rec.seeds
    assert sub["val_bpb"] == pytest.approx(np.mean(rec.bpbs), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(np.std(rec.bpbs, ddof=1), rel=1e-9)
    assert sub["val_loss"] == pytest.approx(np.mean(rec.losses), abs=1e-12)
    assert sub["delta_bpb"] == pytest.approx(np.mean(rec.bpbs) - np.mean(rec.base), abs=1e-12)
    assert sub["delta_nats"] == pytest.approx(sub["delta_bpb"] * math.log(2), abs=1e-12)
    ref = stats.ttest_ind(rec.bpbs, rec.base, equal_var=False, alternative="less")
    assert sub["welch_t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert sub["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    if hasattr(ref, "df"):
        assert sub["welch_df"] == pytest.approx(ref.df, rel=1e-9)
    assert sub["p_value"] < 0.01
    assert sub["bytes_code"] == rec.size
    assert sub["bytes_total"] == 15_960_000 + rec.size
    assert sub["hardware"] == "NVIDIA H100 80GB HBM3 x8" and sub["gpu_count"] == 8
    assert sub["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert (sub["python_version"], sub["pytorch_version"], sub["cuda_version"]) == \
        ("3.12.3", "2.11.0+cu130", "13.0")
    s42 = sub["seed_results"]["42"]
    assert s42["val_bpb"] == rec.bpbs[0] and s42["val_loss"] == rec.losses[0]
    assert s42["steps"] == 5453 and s42["train_time_ms"] == 590026
    assert s42["artifact_bytes"] == 15_960_000 + rec.size
    assert s42["score_line"] == "final_int6_sliding_window"
    assert s42["final_int6_ttt"]["val_bpb"] == 1.336032  # recorded, not the score
    assert "final_int6_ttt" not in sub["seed_results"]["314"]
    readme = (rec.out / "README.md").read_text()
    assert f"{np.mean(rec.bpbs):.8f}" in readme and "ln 2" in readme and "nats per byte" in readme
    png = (rec.out / "train_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image as mpimg
    img = mpimg.imread(str(rec.out / "train_curves.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert not (ROOT / "submission.json").exists()


def test_record_roundtrip_fallback_and_no_stop(rec):
    logs = rec.write_logs({0: dict(sliding=False), 1: dict(sliding=False),
                           2: dict(sliding=False, stop=False, steps=20000)})
    assert rec.run(logs) == 0
    sub = json.loads((rec.out / "submission.json").read_text())
    r314 = sub["seed_results"]["314"]
    assert r314["score_line"] == "final_int6_roundtrip"
    assert r314["val_bpb"] == pytest.approx(rec.bpbs[1] + 0.0186, abs=1e-8)
    assert sub["seed_results"]["999"]["steps"] == 20000
    assert sub["val_bpb"] == pytest.approx(np.mean(rec.bpbs) + 0.0186, abs=1e-8)


def test_record_accepts_source_hash_and_prebuilt_wrapper(rec):
    src_sha = hashlib.sha256(SCRIPT_SRC.encode()).hexdigest()
    ov = {i: dict(code_sha=src_sha, code_size=len(SCRIPT_SRC)) for i in range(3)}
    assert rec.run(rec.write_logs(ov)) == 0
    # a prebuilt wrapper given as --script is shipped byte for byte
    prebuilt = rec.tmp / "prebuilt.py"
    prebuilt.write_text(bw.make_wrapper(SCRIPT_SRC, check="none"))
    psha = hashlib.sha256(prebuilt.read_bytes()).hexdigest()
    ov = {i: dict(code_sha=psha, code_size=prebuilt.stat().st_size) for i in range(3)}
    logs = rec.write_logs(ov)
    assert bw.main(["record", "--logs", *logs, "--name", "n", "--author", "a", "--script",
                    str(prebuilt), "--out", str(rec.tmp / "r2")]) == 0
    assert (rec.tmp / "r2" / "train_gpt.py").read_bytes() == prebuilt.read_bytes()
    sub = json.loads((rec.tmp / "r2" / "submission.json").read_text())
    assert "delta_bpb" not in sub and sub["bytes_code"] == prebuilt.stat().st_size


@pytest.mark.parametrize("case,msg", [
    ("hash_differs", "different code"),
    ("hash_unknown", "matches neither"),
    ("oversize", "exceeds"),
    ("overtime", "over 600000"),
    ("dup_seed", "duplicate seeds"),
    ("missing_budget", "training_budget"),
    ("code_size", "Code size"),
])
def test_record_refusals(rec, capsys, case, msg):
    other = "ab" * 32
    seeds = None
    ov = {}
    if case == "hash_differs":
        ov = {2: dict(code_sha=other)}
    elif case == "hash_unknown":
        ov = {i: dict(code_sha=other) for i in range(3)}
    elif case == "oversize":
        ov = {1: dict(model_bytes=16_000_001 - rec.size)}
    elif case == "overtime":
        ov = {0: dict(total_ms=600_001)}
    elif case == "dup_seed":
        seeds = [42, 314, 42]
    elif case == "code_size":
        ov = {0: dict(code_size=rec.size + 1)}
    logs = rec.write_logs(ov, seeds=seeds)
    if case == "missing_budget":
        p = Path(logs[1])
        p.write_text("".join(l for l in p.read_text().splitlines(True)
                             if not l.startswith("training_budget")))
    assert rec.run(logs) == 1
    err = capsys.readouterr().err
    assert msg in err and "nothing written" in err
    assert not rec.out.exists()
    assert not (rec.out.parent.exists() and list(rec.out.parent.iterdir()))


def test_record_boundaries_accepted(rec):
    # exactly at the limits is fine
    ov = {0: dict(model_bytes=16_000_000 - rec.size, total_ms=600_000, train_ms=590_000)}
    assert rec.run(rec.write_logs(ov)) == 0


def test_record_refuses_non_empty_out(rec, capsys):
    rec.out.mkdir(parents=True)
    (rec.out / "keep.txt").write_text("x")
    assert rec.run(rec.write_logs()) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in rec.out.iterdir()) == ["keep.txt"]


def test_parse_log_fields_and_extra_lines(rec):
    text = make_log(7, 1.1, 2.5, code_sha=rec.sha, code_size=123, ttt=True)
    r = bw.parse_log(text)
    assert r["seed"] == 7 and r["code_sha256"] == rec.sha and r["code_size"] == 123
    assert r["env"]["cudnn"] == "91002" and r["env"]["git_commit"] == "abc1234"
    assert [v["step"] for v in r["val"]] == [0, 4000, 5453]
    assert r["val"][1]["train_time_ms"] == pytest.approx(6.64 * 60000)
    assert [t["step"] for t in r["train"]] == [1, 2, 500, 1000, 4000]
    assert r["stop"]["train_time_ms"] == 590026 and r["steps"] == 5453
    assert r["budget"] == dict(train_ms=590026, gptq_ms=9500, total_ms=599526, limit_ms=600000)
    assert r["model_bytes"] == 15_960_000 and r["total_bytes"] == 15_960_123
    assert r["prequant"]["val_bpb"] == pytest.approx(1.107)
    assert r["finals"]["int6_sliding_window"]["eval_time"] == 76195
    assert r["score_source"] == "int6_sliding_window" and r["val_bpb"] == 1.1
    with pytest.raises(bw.RecordError, match="code_sha256"):
        bw.parse_log(text.replace("code_sha256", "code_sha"))
    with pytest.raises(bw.RecordError, match="final_int6"):
        bw.parse_log(text.replace("final_int6_", "x_"))
    with pytest.raises(bw.RecordError, match="env: gpu"):
        bw.parse_log(text.replace("env: gpu", "env: gpx"))


def test_welch_matches_scipy():
    from scipy import stats
    rng = np.random.default_rng(0)
    for _ in range(25):
        n1, n2 = rng.integers(2, 8, size=2)
        a = rng.normal(1.09, rng.uniform(1e-4, 1e-2), n1)
        b = rng.normal(1.09 + rng.uniform(-0.01, 0.02), rng.uniform(1e-4, 1e-2), n2)
        got = bw.welch_ttest_less(list(a), list(b))
        ref = stats.ttest_ind(a, b, equal_var=False, alternative="less")
        assert got["welch_t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-300)
    for t, df in [(-3.2, 2.7), (0.0, 4.0), (1.5, 30.5), (-40.0, 3.1)]:
        assert bw.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9)
    assert bw.welch_ttest_less([1.0], [2.0, 3.0])["p_value"] is None


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import build_wrapper, sys; "
                        "print('matplotlib' in sys.modules)"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False" and r.stderr == ""


# ----------------------------------------------------------------------------- review fixes

def _assert_refused(rec, capsys, logs, msg, *extra):
    assert rec.run(logs, *extra) == 1
    err = capsys.readouterr().err
    assert msg in err and "nothing written" in err, err
    assert not rec.out.exists()
    return err


def test_parse_log_new_fields(rec):
    text = make_log(7, 1.1, 2.5, code_sha=rec.sha, code_size=123, eval_total_ms=91_234,
                    run_id="abc")
    r = bw.parse_log(text)
    assert r["run_id"] == "abc" and r["eval_total_ms"] == 91_234 and r["ignored_runs"] == 0
    assert r["env"]["tokenizer_sha256"] == TOK_SHA and r["data_fingerprint"] == DATA_FP
    assert r["hparams"]["seed"] == "7" and r["hparams"]["num_layers"] == "11"
    assert r["hparams"]["eval_only"] == "" and r["hparams"]["dump_token_nll"] == ""
    for gone, msg in [("eval_total: ", "eval_total"), ("env: tokenizer_sha256", "tokenizer_sha256"),
                      ("env: data_fingerprint", "data_fingerprint"),
                      ("Hyperparameters:", "Hyperparameters")]:
        with pytest.raises(bw.RecordError, match=msg):
            bw.parse_log(text.replace(gone, "x" + gone))


def test_split_runs():
    text = "pre\nrun_id: a started: t\nx\nrun_id: b started: t\ny\n"
    assert bw.split_runs(text) == ["pre\nrun_id: a started: t\nx\n", "run_id: b started: t\ny\n"]
    assert bw.split_runs("no ids\n") == ["no ids\n"]
    # an indented source-dump line is not a run start
    assert len(bw.split_runs("run_id: a\n    log(f'run_id: {x}')\n")) == 1


def test_log_with_eval_only_runs_uses_the_training_run(rec):
    logs = rec.write_logs()
    p = Path(logs[1])
    train = p.read_text()
    # re-score runs before and after the training run, with other seeds and scores
    before = make_eval_only_log(777, 1.5, 3.5, code_sha=rec.sha, code_size=rec.size, run_id="r0")
    after = make_eval_only_log(778, 1.7, 3.9, code_sha=rec.sha, code_size=rec.size, run_id="r1",
                               eval_total_ms=700_000)  # not the training run's: not checked
    p.write_text(before + train + after)
    assert rec.run(logs) == 0
    sub = json.loads((rec.out / "submission.json").read_text())
    assert sub["seeds"] == rec.seeds
    s = sub["seed_results"]["314"]
    assert s["val_bpb"] == rec.bpbs[1] and s["val_loss"] == rec.losses[1]
    assert s["run_id"] == "run_seed314" and s["eval_total_ms"] == 95_000
    assert (rec.out / "train_seed314.log").read_text() == before + train + after


def test_log_with_two_training_runs_refused(rec, capsys):
    logs = rec.write_logs()
    p = Path(logs[0])
    p.write_text(p.read_text() + make_log(42, 1.2, 2.7, code_sha=rec.sha, code_size=rec.size,
                                          run_id="again", extra=False))
    err = _assert_refused(rec, capsys, logs, "give one training run per log")
    assert "run_seed42" in err and "again" in err


def test_log_with_only_eval_only_run_refused(rec, capsys):
    logs = rec.write_logs()
    Path(logs[2]).write_text(make_eval_only_log(999, 1.0, 2.4, code_sha=rec.sha,
                                                code_size=rec.size))
    _assert_refused(rec, capsys, logs, "training_budget")


@pytest.mark.parametrize("which", ["bpb", "loss", "inf"])
def test_non_finite_score_refused(rec, capsys, which):
    logs = rec.write_logs()
    p = Path(logs[1])
    t = p.read_text()
    line = next(l for l in t.split("\n") if l.startswith("final_int6_sliding_window"))
    bad = {"bpb": line.replace(f"val_bpb:{rec.bpbs[1]:.8f}", "val_bpb:nan"),
           "loss": line.replace(f"val_loss:{rec.losses[1]:.8f}", "val_loss:nan"),
           "inf": line.replace(f"val_bpb:{rec.bpbs[1]:.8f}", "val_bpb:inf")}[which]
    assert bad != line
    p.write_text(t.replace(line, bad))
    _assert_refused(rec, capsys, logs, "not finite")


@pytest.mark.parametrize("base", ["nan,1.1,1.2", "1.1,inf", "-inf"])
def test_non_finite_baseline_refused(rec, capsys, base):
    logs = rec.write_logs()
    assert bw.main(["record", "--logs", *logs, "--name", "n", "--author", "a", "--script",
                    str(rec.script), f"--baseline-bpb={base}", "--out", str(rec.out)]) == 1
    assert "finite" in capsys.readouterr().err and not rec.out.exists()
    with pytest.raises(bw.RecordError, match="finite"):
        bw.assemble_record(logs, "n", "a", script=str(rec.script), out=str(rec.out),
                           baseline_bpb=[1.1, float(base.split(",")[-1])] if "inf" in base
                           else [float("nan"), 1.1])
    assert not rec.out.exists()


def test_non_finite_optional_line_is_null_in_strict_json(rec):
    logs = rec.write_logs({0: dict(ttt=True, ttt_bpb="nan")})
    assert rec.run(logs) == 0
    text = (rec.out / "submission.json").read_text()

    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c}")
    sub = json.loads(text, parse_constant=no_constants)
    assert sub["seed_results"]["42"]["final_int6_ttt"]["val_bpb"] is None
    assert sub["seed_results"]["42"]["val_bpb"] == rec.bpbs[0]


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None)
                  for p in Path(path).rglob("*"))


@pytest.mark.parametrize("target", ["cwd", "cwd_parent", "script_dir", "log_dir", "log_file"])
def test_force_refuses_out_holding_inputs(rec, capsys, monkeypatch, target):
    logdir = rec.tmp / "runlogs"
    logdir.mkdir()
    logs = []
    for p in rec.write_logs():
        q = logdir / Path(p).name
        Path(p).rename(q)
        logs.append(str(q))
    (rec.tmp / "submission.json").write_text("{}")  # looks like a record: still refused
    (logdir / "submission.json").write_text("{}")
    work = rec.tmp / "work"
    work.mkdir()
    (work / "keep.txt").write_text("work in progress")
    monkeypatch.chdir(work)
    out = {"cwd": ".", "cwd_parent": "..", "script_dir": str(rec.tmp), "log_dir": str(logdir),
           "log_file": logs[0]}[target]
    before = _tree(rec.tmp)
    assert bw.main(["record", "--logs", *logs, "--name", "n", "--author", "a", "--script",
                    str(rec.script), "--out", out, "--force"]) == 1
    err = capsys.readouterr().err
    assert "is or contains" in err and "nothing written" in err
    assert _tree(rec.tmp) == before


def test_force_only_replaces_a_previous_record(rec, capsys):
    logs = rec.write_logs()
    rec.out.mkdir(parents=True)
    (rec.out / "precious.txt").write_text("x")
    assert rec.run(logs, "--force") == 1
    assert "not a previous record" in capsys.readouterr().err
    assert sorted(p.name for p in rec.out.iterdir()) == ["precious.txt"]
    # a file is never replaced
    (rec.out / "precious.txt").unlink()
    rec.out.rmdir()
    rec.out.write_text("file")
    assert rec.run(logs, "--force") == 1
    assert rec.out.read_text() == "file"
    rec.out.unlink()
    # a previous record is replaced, leaving nothing aside
    assert rec.run(logs) == 0
    (rec.out / "old_extra.txt").write_text("old")
    assert rec.run(logs, "--force") == 0
    assert "old_extra.txt" not in {p.name for p in rec.out.iterdir()}
    assert (rec.out / "submission.json").exists()
    assert sorted(p.name for p in rec.out.parent.iterdir()) == [rec.out.name]


def test_force_restores_old_record_when_rename_fails(rec, monkeypatch):
    logs = rec.write_logs()
    assert rec.run(logs) == 0
    (rec.out / "marker.txt").write_text("old")
    old = _tree(rec.out)
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder into place
            raise OSError("simulated failure")
        return real_rename(a, b)
    monkeypatch.setattr(bw.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        bw.assemble_record(logs, "n", "a", script=str(rec.script), out=str(rec.out), force=True)
    monkeypatch.undo()
    assert len(calls) >= 2
    assert _tree(rec.out) == old
    assert sorted(p.name for p in rec.out.parent.iterdir()) == [rec.out.name]


def test_record_folder_mode_and_utf8_readme(rec, monkeypatch):
    import builtins
    real_open = builtins.open

    def strict_open(file, mode="r", *a, **kw):  # text-mode opens must name their encoding
        if "b" not in mode:
            assert kw.get("encoding") or (len(a) >= 2 and a[1]), (file, mode)
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr(bw, "open", strict_open, raising=False)
    logs = rec.write_logs()
    bw.assemble_record(logs, "Ünïcode → record ✓", "Zoë", script=str(rec.script),
                       out=str(rec.out))
    monkeypatch.undo()
    assert (rec.out / "README.md").read_text(encoding="utf-8").startswith("# Ünïcode → record ✓")
    assert json.loads((rec.out / "submission.json").read_text(encoding="utf-8"))["author"] == "Zoë"
    assert (rec.out.stat().st_mode & 0o777) == 0o755


@pytest.mark.parametrize("case,ov,msg", [
    ("tokenizer", {2: dict(tok_sha="3d" * 32)}, "tokenizer_sha256"),
    ("data", {1: dict(data_fp="4c" * 32)}, "data_fingerprint"),
    ("hparams", {1: dict(hp={"num_layers": 12, "train_files": "./other/*.bin"})},
     "hyperparameters num_layers, train_files"),
    ("hparam_missing", {2: dict(hp={"matrix_lr": None})}, "hyperparameters matrix_lr"),
    ("world_size", {0: dict(hp={"world_size": 4})}, "hyperparameters world_size"),
    ("eval_time", {1: dict(eval_total_ms=600_001)}, "eval_total 600001 ms exceeds"),
    ("mixed_score", {2: dict(sliding=False)}, "scored by different lines"),
])
def test_cross_log_refusals(rec, capsys, case, ov, msg):
    _assert_refused(rec, capsys, rec.write_logs(ov), msg)


def test_cross_log_allowed_differences(rec):
    ov = {i: dict(hp={"rank": 0, "local_rank": i, "out_dir": f"/o{i}", "dump_token_nll": f"d{i}",
                      "run_id": f"id{i}"}, eval_total_ms=600_000 - i) for i in range(3)}
    ov[1]["data_fp"] = DATA_FP  # same hex, other shard text is not compared
    assert rec.run(rec.write_logs(ov)) == 0
    assert sorted(bw.HPARAMS_MAY_DIFFER) == sorted(
        ["seed", "run_id", "rank", "local_rank", "out_dir", "dump_token_nll"])


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
    assert bw._split_lines("a\u2028b\x0cc\nd\n") == ["a\u2028b\x0cc\n", "d\n"]
    assert bw._split_lines("a\n\nb") == ["a\n", "\n", "b"] and bw._split_lines("") == []


def test_bom_source_is_decoded(tmp_path, rec):
    src = tmp_path / "bom.py"
    src.write_bytes(b"\xef\xbb\xbf" + "print('hi')  # c\n".encode())
    out = tmp_path / "w.py"
    assert bw.main([str(src), "-o", str(out), "--strip"]) == 0
    assert bw.extract_source(out.read_text()) == "print('hi')\n"
    r = run_py(out)
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    # record: a BOM script is wrapped without the BOM; logs may name the file's own hash
    rec.script.write_bytes(b"\xef\xbb\xbf" + SCRIPT_SRC.encode())
    logs = rec.write_logs()
    assert rec.run(logs) == 0
    assert (rec.out / "train_gpt.py").read_text() == rec.wrapper
