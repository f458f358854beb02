"""Bad data and a full disk: the stage fails in one line naming the cause, or rejects only the bad
pair; previous outputs are untouched and no staging folder stays behind."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from fault_fixtures import files, full_disk, leftovers, stage_argv, stage_cmd, stage_main

pytestmark = pytest.mark.faults


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def test_corrupted_patch_shard(workspace, tmp_path, monkeypatch, capsys):
    """stats on data/patches with one shard overwritten: one line naming the shard, old stats kept."""
    monkeypatch.chdir(workspace)
    patches = tmp_path / "patches"
    shutil.copytree(workspace / "patches", patches)
    shard = sorted(patches.glob("part-*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-file
    out = tmp_path / "run"
    shutil.copytree(workspace / "stats", out / "stats")
    before = files(out / "stats")
    argv = ["--params", str(workspace / "params.yaml"), *stage_argv("stats", workspace, out)]
    argv[argv.index("--patches") + 1] = str(patches)
    assert stage_main("stats")(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_errors(err)) == 1, err[-3000:]
    assert shard.name in _errors(err)[0]
    assert files(out / "stats") == before and leftovers(out) == []


def test_duplicate_stem_rejects_that_pair_and_registers_the_others(workspace, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(workspace)
    raw = tmp_path / "raw"
    shutil.copytree(workspace / "raw", raw)
    shutil.copy(raw / "ir" / "demo_000.png", raw / "ir" / "demo_000.jpg")
    out = tmp_path / "run"
    argv = ["--params", str(workspace / "params.yaml"), *stage_argv("register", workspace, out)]
    argv[argv.index("--raw") + 1] = str(raw)
    assert stage_main("register")(argv) == 0
    manifest = pd.read_parquet(out / "registered" / "manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]["pair_id"].tolist()
    assert sorted(ok) == [f"demo_{i:03d}" for i in range(1, 8)]
    rejected = manifest[manifest["pair_id"] == "demo_000"]["reason"].tolist()
    assert rejected and all(r.startswith("duplicate_stem:") for r in rejected)


def test_full_disk(workspace, tmp_path):
    """crop onto a 256 KiB file system (its patches need ~330 KiB): one line, nothing left behind;
    a disk already full is refused before the stage starts."""
    disk = tmp_path / "disk"
    with full_disk(disk, size_kib=256) as limit:
        out = disk / "run"
        done = subprocess.run(stage_cmd("crop", workspace, out), cwd=workspace, capture_output=True, text=True,
                              timeout=300, preexec_fn=limit)
        assert done.returncode == 1, done.stderr[-3000:]
        # Ray Data logs the failed task with its traceback; the stage's own report is its last line
        last = [line for line in done.stderr.splitlines() if line.strip()][-1]
        assert last.startswith("crop: error:") and len(_errors(done.stderr)) == 1, done.stderr[-3000:]
        assert "No space left on device" in last or "File too large" in last
        assert not (out / "patches").exists() and leftovers(disk) == []
        if limit is None:  # a real file system: fill it, then the preflight refuses
            with open(disk / "filler", "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            done = subprocess.run(stage_cmd("crop", workspace, out), cwd=workspace, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 1 and "cannot write in" in done.stderr and "running" not in done.stderr
