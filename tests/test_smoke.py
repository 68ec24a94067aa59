"""The README's smoke command, shortened: SMOKE=1 builds shards from the embedded sample, trains, quantizes,
packs and evaluates, and says where the log and the artifact went."""
import os
import re

from conftest import run_train


def test_smoke_command_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SMOKE="1", DATA_DIR=str(tmp_path / "smoke_data"), OUT_DIR=str(tmp_path / "run"),
               MAX_WALLCLOCK_SECONDS="12", VAL_LOSS_EVERY="0", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    r = run_train(env, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "smoke: building shards from the embedded sample" in out
    assert (tmp_path / "smoke_data" / "datasets" / "fineweb10B_sp4096" / "manifest.json").is_file()
    assert "  model_dim: 64" in out and "  vocab_size: 4096" in out  # the smoke config, not the 8xH100 one
    assert "stopping_early: wallclock_cap" in out
    for line in ("final_int6_roundtrip", "final_int6_sliding_window", "Total submission size int6+brotli"):
        assert line in out, line
    art = re.search(r"^artifact: (.+)$", out, re.M).group(1)
    log = re.search(r"^log: (.+)$", out, re.M).group(1)
    assert art == str((tmp_path / "run" / "final_model.int6.ptz").resolve()) and os.path.getsize(art) > 0
    assert f"artifact: {art}" in open(log).read()
    # a second run reuses the shards instead of rebuilding them
    r2 = run_train({**env, "MAX_WALLCLOCK_SECONDS": "6", "RUN_ID": "again"}, timeout=170)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "smoke: building" not in r2.stdout
