"""Atomic output and the one JSON reader."""

from __future__ import annotations

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
