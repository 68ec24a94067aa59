"""Failures end cleanly: an exception on any rank ends every rank within seconds, with no launcher to kill the others
(two plain processes here, rank 0 hosting the store, as under a launcher other than torchrun); the error and its
traceback reach stderr and the log file, the exit code is non-zero, and no temporary file is left behind. A divergence
(a non-finite training loss on any rank) stops every rank at the same step with one error line and nothing written."""
import math
import re
import socket
import subprocess
import sys
import time

import pytest

import train_gpt as t
from conftest import ROOT, tiny_env

WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
import train_gpt as t
fail_rank, marker = int(os.environ["FAIL_RANK"]), os.environ["FAIL_MARKER"]
train_step = t.train_step
def failing_step(model, base, opts, tokens, hp, step, *a, **k):
    if hp.rank == fail_rank and step == 3:
        open(marker, "w").write(repr(time.time()))
        raise RuntimeError("injected failure at step 3")
    if hp.rank != fail_rank and step == 3:
        time.sleep(3600)  # stands in for an NCCL collective whose peer is gone: it never returns
    return train_step(model, base, opts, tokens, hp, step, *a, **k)
if fail_rank >= 0:
    t.train_step = failing_step
write_atomic = t.write_atomic
def marked_write(path, data):
    if path.name.endswith(".ptz"):
        open(marker, "w").write(repr(time.time()))
    return write_atomic(path, data)
t.write_atomic = marked_write
sys.exit(t.main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, env, world, fail_rank):
    """`world` plain processes (no launcher); returns [(returncode, seconds after the failure, stdout, stderr)]."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT)))
    marker = tmp_path / "failed_at"
    env = dict(env, FAIL_RANK=str(fail_rank), FAIL_MARKER=str(marker), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs, files = [], []
    for r in range(world):
        out, err = open(tmp_path / f"rank{r}.out", "w+"), open(tmp_path / f"rank{r}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, str(worker)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                      stdout=out, stderr=err, cwd=str(ROOT)))
    ended, deadline = [None] * world, time.time() + 240
    while None in ended and time.time() < deadline:
        for r, p in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert None not in ended, "a rank did not end within 240 s"
    failed_at = float(marker.read_text())
    results = []
    for p, end, (out, err) in zip(procs, ended, files):
        out.seek(0), err.seek(0)
        results.append((p.returncode, end - failed_at, out.read(), err.read()))
        out.close(), err.close()
    return results


def test_rank1_fails_in_training_both_ranks_end(tmp_path, tiny_data_dir):
    """Rank 0 is blocked for good when rank 1 fails: only the watchdog can end it."""
    out = tmp_path / "out"
    env = tiny_env(tiny_data_dir, out, RUN_ID="fail", ITERATIONS=40)
    (r0, dt0, out0, err0), (r1, dt1, out1, err1) = launch(tmp_path, env, 2, fail_rank=1)
    assert r0 == 1 and r1 == 1, (r0, err0[-2000:], r1, err1[-2000:])
    assert dt0 < 15 and dt1 < 15, (dt0, dt1)
    assert "Traceback" in err1 and "injected failure at step 3" in err1
    assert "ends because a peer failed" in err0 and "injected failure at step 3" in err0
    log = (out / "logs" / "fail.txt").read_text()
    assert "1/40 train_loss" in log and "Traceback" in log and "RuntimeError: injected failure at step 3" in log
    assert "final_int6" not in log
    assert not list(out.rglob("*.tmp*"))


@pytest.mark.parametrize("world", [1, 2])
def test_export_failure_on_rank0_ends_every_rank_and_leaves_no_temp_file(tmp_path, tiny_data_dir, world):
    """The issue's case: a folder where the artifact goes. Before, the log ended at `Serialized model: ...` and a
    914 kB final_model.int6.ptz.tmp<pid> stayed behind."""
    out = tmp_path / "out"
    (out / "final_model.int6.ptz").mkdir(parents=True)
    env = tiny_env(tiny_data_dir, out, RUN_ID="export", ITERATIONS=4, SLIDING_WINDOW_ENABLED=0)
    results = launch(tmp_path, env, world, fail_rank=-1)
    for rc, dt, _, err in results:
        assert rc == 1 and dt < 15, (rc, dt, err[-2000:])
    err0 = results[0][3]
    assert "Traceback" in err0 and "IsADirectoryError" in err0
    log = (out / "logs" / "export.txt").read_text()
    assert "Code size:" in log and "Traceback" in log and "IsADirectoryError" in log
    assert "final_int6_roundtrip" not in log
    if world == 2:
        assert "ends because a peer failed" in results[1][3]
    assert not list(out.rglob("*.tmp*"))


def test_write_atomic_removes_its_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "artifact.bin"

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(t.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        t.write_atomic(target, b"x" * 1000)
    assert list(tmp_path.iterdir()) == [] and not t.TEMP_FILES
    monkeypatch.undo()
    t.write_atomic(target, b"abc")
    assert target.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]



# ---------------------------------------------------------------------------- divergence

DIVERGE_WORKER = """
import math, os, sys
sys.path.insert(0, {root!r})
import train_gpt as t
if os.environ["RANK"] == os.environ["BAD_RANK"] and os.environ["CASE"] == "nan_lr":
    t.lr_multiplier = lambda *a: math.nan  # a NaN learning rate (validation refuses one from the env)
if os.environ["RANK"] == os.environ["BAD_RANK"] and os.environ["CASE"] == "huge_lr":
    os.environ["MATRIX_LR"] = "1e30"
sys.exit(t.main())
"""


def run_ranks(tmp_path, env, world: int) -> list:
    """`world` plain processes of DIVERGE_WORKER; [(returncode, stdout, stderr)]."""
    worker = tmp_path / "diverge.py"
    worker.write_text(DIVERGE_WORKER.format(root=str(ROOT)))
    env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, str(worker)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
             for r in range(world)]
    outs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def assert_diverged(out_dir, rc, err, step, lrs, rank="", last=None):
    """One `error:` line (stderr, and the log's last line) naming the step (and the rank), the last finite loss
    (by default the step before's) and the learning rates; exit code 1; nothing written but the log."""
    lines = [l for l in err.splitlines() if l.startswith("error")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    mine = " \\(rank 0's\\)" if rank else ""
    m = re.fullmatch(rf"error: training diverged: train_loss is not finite at step {step}/6{rank} \(last finite "
                     rf"train_loss{mine}: (\d+\.\d+)\); learning rates at that step{mine}: {lrs}; nothing written",
                     lines[0])
    assert m, lines[0]
    log = (out_dir / "logs" / "div.txt").read_text().splitlines()
    assert log[-1] == lines[0]
    loss = lambda s: float(next(l for l in log if l.startswith(f"{s}/6 train_loss")).split()[2])
    assert float(m[1]) == loss(last or step - 1)
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")) == ["logs", "logs/div.txt"]


@pytest.mark.parametrize("case", ["nan_lr", "huge_lr"])
def test_divergence_stops_one_process_at_once(tmp_path, tiny_data_dir, monkeypatch, capsys, case):
    """Before: MATRIX_LR=nan (or 1e30) trained on with `train_loss: nan`, wrote a NaN artifact, evaluated it three
    times and exited 0. Now the step after the LR goes wrong ends the run. In-process (cheap): main() as the CLI."""
    out = tmp_path / "out"
    env = tiny_env(tiny_data_dir, out, RUN_ID="div", ITERATIONS=6)
    if case == "nan_lr":
        monkeypatch.setattr(t, "lr_multiplier", lambda *a: math.nan)
        lrs = "matrix nan tied_embed nan scalar nan"
    else:
        env["MATRIX_LR"] = "1e30"  # finite: the weights overflow at the first update, the loss after it
        lrs = "matrix 1e\\+30 tied_embed 0.03 scalar 0.02"
    capsys.readouterr()
    rc = t.main(env)
    assert_diverged(out, rc, capsys.readouterr().err, 2, lrs)


@pytest.mark.parametrize("case", ["nan_lr", "huge_lr"])
def test_divergence_stops_every_rank_at_the_same_step(tmp_path, tiny_data_dir, case):
    """2 gloo processes, the learning rate wrong on rank 1 alone (each rank applies its own LR to its copy of the
    weights): only rank 1's loss is non-finite at step 2, rank 0's is still finite, and the flag, MAX-reduced with
    the step time, stops both ranks there; rank 0 reports."""
    out = tmp_path / "out"
    env = tiny_env(tiny_data_dir, out, RUN_ID="div", ITERATIONS=6, BAD_RANK=1, CASE=case)
    (rc0, out0, err0), (rc1, out1, err1) = run_ranks(tmp_path, env, 2)
    assert_diverged(out, rc0, err0, 2, "matrix 0.02 tied_embed 0.03 scalar 0.02", " on rank 1", last=2)
    assert rc1 == 1 and out1 == "" and "error" not in err1, err1[-2000:]
