"""check_output: outputs are validated before any work (issue 13)."""

from __future__ import annotations

import pytest
from fault_fixtures import read_only_dir

from pipeline.common.preflight import OutputError, check_output


def test_writable_outputs_pass_and_nothing_is_left_behind(tmp_path):
    assert check_output(tmp_path / "new" / "deeper" / "out.csv", "file") == tmp_path / "new" / "deeper" / "out.csv"
    check_output(tmp_path / "folder", "dir")
    (tmp_path / "staged").mkdir()
    check_output(tmp_path / "staged", "staged-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged"]


@pytest.mark.parametrize("case, kind, message", [
    ("under_file", "file", "is a file, not a folder"),
    ("under_file", "dir", "is a file, not a folder"),
    ("folder_as_file", "file", "is a folder, expected a file name"),
    ("file_as_folder", "dir", "is a file, expected a folder"),
])
def test_impossible_paths_are_one_line_errors(tmp_path, case, kind, message):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    path = {"under_file": tmp_path / "plain.txt" / "sub" / "out.csv", "folder_as_file": tmp_path / "folder",
            "file_as_folder": tmp_path / "plain.txt"}[case]
    with pytest.raises(OutputError, match=message) as err:
        check_output(path, kind, "--out")
    assert str(err.value).startswith(f"--out {path}:") and "\n" not in str(err.value)


def test_read_only_folder_is_refused_even_for_root(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        for kind, path in (("file", ro / "x.csv"), ("dir", ro / "out"), ("dir", ro), ("staged-dir", ro / "out")):
            with pytest.raises(OutputError, match="cannot write in"):
                check_output(path, kind)
