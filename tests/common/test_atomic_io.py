"""Atomic output and the one JSON reader."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipeline.common.atomic_io import atomic_writer, read_json_object, replace_dir, staging_dir, write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_writer(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left


def test_staged_folder_replaces_whole(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "stale.txt").write_text("x")
    tmp = staging_dir(final)
    (tmp / "new.txt").write_text("y")
    replace_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_staged_folder_drops_temps_of_killed_writers(tmp_path):
    """A writer SIGKILLed mid-file (a lost Ray worker) cannot remove its temporary file; the
    published folder must not carry it, while the finished files and ordinary dot-files stay."""
    final = tmp_path / "result"
    tmp = staging_dir(final)
    (tmp / "ir").mkdir()
    write_json(tmp / "ir" / "done.json", {"ok": 1})
    (tmp / ".keep.tmp").write_text("not a writer's temporary file")
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from pipeline.common.atomic_io import atomic_writer\n"
        f"with atomic_writer({str(tmp / 'ir' / 'half.png')!r}) as fh:\n"
        "    fh.write(b'half'); fh.flush(); print('writing', flush=True); signal.pause()\n"
    )], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    stray = [p.name for p in (tmp / "ir").iterdir() if p.name.startswith(".half.png.")]
    assert len(stray) == 1 and stray[0].endswith(".tmp")  # what the killed writer left
    replace_dir(tmp, final)
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == [".keep.tmp", "ir", "ir/done.json"]


def test_read_json_object(tmp_path):
    path = write_json(tmp_path / "a.json", {"run_id": "r", "empty": ""})
    assert read_json_object(path, "summary")["run_id"] == "r"
    with pytest.raises(FileNotFoundError, match=r"summary not found: .*b.json \(run it\)"):
        read_json_object(tmp_path / "b.json", "summary", hint="run it")
    with pytest.raises(ValueError, match="missing 'empty'"):
        read_json_object(path, "summary", required=("run_id", "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json_object(tmp_path / "bad.json", "summary")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_json_object(tmp_path / "list.json", "summary")
