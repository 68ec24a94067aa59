"""Failures end cleanly: an exception on any rank ends every rank within seconds, with no launcher to kill the others
(two plain processes here, rank 0 hosting the store, as under a launcher other than torchrun); the error and its
traceback reach stderr and the log file, the exit code is non-zero, and no temporary file is left behind."""
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

