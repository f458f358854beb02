"""``mda fuse`` on folders: per-pair isolation, memory included, and outputs checked first (issue 13).

The network is the default MDA architecture with random weights (the memory estimate was measured
on it); the "large" pair is 2000x1500, whose estimated peak (about 4.3 GiB) exceeds the limits set
here, while the small pairs need well under 200 MiB.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_fixtures import read_only_dir

from pipeline.cli import main
from pipeline.cli.fuse import FUSE_BYTES_PER_PIXEL, fuse_memory_estimate
from pipeline.data.images import write_image

REPO = Path(__file__).resolve().parents[2]
LARGE = (1500, 2000)
#: ``mda`` in a child process.
MDA = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    import torch

    from pipeline.model.network import build_model
    from pipeline.model.weights import save_checkpoint

    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("w") / "mda.pt", build_model("mda"), "mda", {}))


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path]:
    """ir/, vi/ with a large pair 'big' between two small pairs 'a' and 'c'."""
    rng = np.random.default_rng(0)
    for stem, (h, w) in (("a", (48, 64)), ("big", LARGE), ("c", (40, 56))):
        write_image(tmp_path / "ir" / f"{stem}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
        write_image(tmp_path / "vi" / f"{stem}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return tmp_path / "ir", tmp_path / "vi"


def _fuse(folders, out, weights, *extra) -> list[str]:
    return ["fuse", "--ir", str(folders[0]), "--vi", str(folders[1]), "-o", str(out), "--weights", weights,
            "--threads", "1", *extra]


def test_estimate_is_linear_in_pixels():
    assert fuse_memory_estimate(1000, 1000) - fuse_memory_estimate(496, 1000) == FUSE_BYTES_PER_PIXEL * 504_000
    assert fuse_memory_estimate(7, 7) == fuse_memory_estimate(8, 8)  # padded to multiples of 8


@pytest.mark.parametrize("limit", [["--max-memory", "1G"], ["--max-pixels", "1000000"], []])
def test_a_pair_too_large_is_refused_and_the_others_are_fused(folders, tmp_path, weights, capsys, monkeypatch, limit):
    if not limit:  # the automatic limit: what the machine says is available
        monkeypatch.setattr("pipeline.common.memory.available_bytes", lambda: 1 << 30)
    out = tmp_path / "out"
    assert main(_fuse(folders, out, weights, *limit)) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    refused = [line for line in err.splitlines() if line.startswith("mda fuse: refused")]
    assert len(refused) == 1 and "big.png" in refused[0] and "2000x1500" in refused[0]
    assert "mda fuse: 2 fused, 1 failed" in err and "failed: " in err


@pytest.mark.faults
def test_under_a_real_address_space_limit(folders, tmp_path, weights):
    """A child under ``RLIMIT_AS`` of 3 GiB: the automatic limit refuses 'big' before fusing it, and
    with the estimate overridden (--max-memory 100G) the allocator's failure is caught the same way."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, expected in (([], "more than the"), (["--max-memory", "100G"], "out of memory while fusing")):
        out = tmp_path / f"out{len(extra)}"
        done = subprocess.run([*MDA, *_fuse(folders, out, weights, *extra)],
                              cwd=REPO, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert "2 fused, 1 failed" in done.stderr


def test_outputs_checked_before_the_model_is_loaded(folders, tmp_path, capsys):
    (tmp_path / "file.png").write_bytes(b"x")
    # the weights do not exist: the output error must come first
    rc = main(_fuse(folders, tmp_path / "file.png" / "out", str(tmp_path / "nope.pt")))
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    with read_only_dir(tmp_path / "ro") as ro:
        assert main(_fuse(folders, ro, str(tmp_path / "nope.pt"))) == 1
        assert "cannot write in" in capsys.readouterr().err
