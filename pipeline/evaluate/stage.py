"""The ``evaluate`` stage: fuse the test split with our model and the baselines, score, report.

Methods compared (same inputs, same batch inference through Ray Data, same metrics):

- ``average``: pixel average of the IR image and the visible luma, ``round((ir + y) / 2)``;
- ``maximum``: pixel maximum of the IR image and the visible luma;
- ``official``: the MDA network with the authors' released weights (only when their file is
  configured and present);
- ``ours``: the network trained by the ``train`` stage (checkpoint named in ``models/train.json``).

Every method returns the fused luma put back together with the visible chroma (colour in, colour
out), exactly as ``mda fuse`` writes it. The metrics follow the published convention (see
``pipeline.evaluate.metrics``): the fused image is converted BGR -> gray as if read back from its PNG file,
so ``mda evaluate`` on the written ``fused/<method>/`` folders gives the same numbers.

Outputs (under ``out_dir``): ``per_image.csv`` (``method,name,<metrics>``), ``table.md`` (means
per method, best value per metric in bold), ``grid.png`` (IR | visible | baselines | ours for a
few pairs), ``fused/<method>/<name>.png``, ``report.html`` (offline page: means, per-pair thumbnails and
metrics, sortable; ``pipeline.evaluate.report.write_visual_report``) with ``inputs/`` and the DVC
image plots ``plots/<grid pair>/``, ``test_set.json`` (the evaluated pairs and their digest,
which the ``promote`` stage uses to compare like with like); and the means per method as JSON (the
DVC metrics file). The report folder is built beside ``out_dir`` and replaces it only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import ray
from mlflow.exceptions import MlflowException

from pipeline.common.atomic_io import replace_dir, staging_dir, write_json, write_text_atomic
from pipeline.common.config import ParamsError, read_settings, setting
from pipeline.common.mlflow_store import log_metrics_batched
from pipeline.common.ray_runtime import configure_data_context
from pipeline.data.contracts import read_split
from pipeline.data.images import find_pairs, merge_luma, read_pair, split_luma, write_image
from pipeline.evaluate.metrics import DIAGNOSTICS, HEADLINE, METRICS, brightness_gaps, compute_all
from pipeline.evaluate.report import (
    METHOD_ORDER, image_grid, markdown_table, mean_per_method, means_for_json, write_per_image_csv,
    write_visual_report,
)
from pipeline.model.inference import Fuser
from pipeline.model.weights import load_model

log = logging.getLogger(__name__)

#: Methods that need no weights.
PIXEL_METHODS: tuple[str, ...] = ("average", "maximum")
#: File under the report folder that identifies the evaluated test set (see ``test_set_record``).
TEST_SET_FILE = "test_set.json"


# --------------------------------------------------------------------------------------------
# Configuration


def _tile(tile: Sequence[Any], key: str) -> tuple[int, int]:
    """``[height, width]``, integers >= 16."""
    if len(tile) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 16 for t in tile):
        raise ParamsError(f"params: '{key}' must be [height, width], integers >= 16, got {tile!r}")
    return (int(tile[0]), int(tile[1]))


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` section of ``params.yaml``.

    Attributes:
        official_weights: the authors' released weights (``fusion_model.pth``); ``None``: no such
            baseline. A configured path that does not exist skips the baseline with a log line, so
            a fresh clone without ``../shared`` still runs.
        batch_size: image pairs per Ray Data batch.
        concurrency: fusion actors (each loads every network once; one GPU each with ``use_gpu``).
        use_gpu: one GPU per model actor; ``None``: when the Ray cluster has GPUs.
        grid_pairs: test pairs shown in ``grid.png`` (the first ones by name).
        grid_tile: (height, width) in pixels of each tile of the grid (images are letterboxed).
        max_pairs: evaluate only the first N test pairs (quick runs); ``None``: all.
    """

    official_weights: str | None = setting(None, str, allow_none=True)
    batch_size: int = setting(2, int, minimum=1)
    concurrency: int = setting(1, int, minimum=1)
    use_gpu: bool | None = setting(None, bool, allow_none=True)
    grid_pairs: int = setting(3, int, minimum=0)
    grid_tile: tuple[int, int] = setting((160, 224), list, convert=_tile)
    max_pairs: int | None = setting(None, int, minimum=1, allow_none=True)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "EvalConfig":
        """Validate the ``evaluate`` section (errors name ``evaluate.<key>``)."""
        return read_settings(cls, cfg, "evaluate")


@dataclass
class EvalResult:
    """What ``evaluate`` produced.

    Attributes:
        per_image: rows ``{"method", "name", <metric>: float}``.
        means: ``{method: {metric: mean}}`` in ``METHOD_ORDER``.
        skipped: ``{method: reason}`` for baselines that were not run.
        paths: output name -> file written.
    """

    per_image: list[dict[str, Any]]
    means: dict[str, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def _collect(
    results: Iterator[dict[str, Any]], methods: Mapping[str, Any], grid_names: set[str], tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Write each streamed fused image to ``tmp/fused/<method>/``; keep its metrics (sorted by
    method order, then name) and the grid pairs' images."""
    per_image: list[dict[str, Any]] = []
    fused_images: dict[str, dict[str, np.ndarray]] = {}
    for r in results:
        method, name = str(r["method"]), str(r["name"])
        img = _unpack(r["fused"], int(r["h"]), int(r["w"]), int(r["c"]))
        write_image(tmp / "fused" / method / f"{name}.png", img)
        if name in grid_names:
            fused_images.setdefault(method, {})[name] = img
        per_image.append({"method": method, "name": name, **{m: float(r[m]) for m in (*METRICS, *DIAGNOSTICS)}})
    order = {m: i for i, m in enumerate(methods)}
    per_image.sort(key=lambda r: (order[r["method"]], r["name"]))
    return per_image, fused_images


# --------------------------------------------------------------------------------------------
# Inputs


def list_test_pairs(registered_dir: str | Path, split_path: str | Path, max_pairs: int | None = None) -> list[dict[str, str]]:
    """The registered image files of the ``test`` split (paths only: nothing is read here).

    Args:
        registered_dir: output of the ``register`` stage (``ir/`` and ``vi/``).
        split_path: ``split.json`` of the ``crop`` stage (``{"test": [pair ids], ...}``).
        max_pairs: keep only the first N pairs by id.

    Returns:
        Rows sorted by name: ``name``, ``ir`` and ``vi`` (file paths).

    Raises:
        FileNotFoundError: a file or folder is missing, or a test pair has no registered images.
        ValueError: ``split.json`` is malformed or its test split is empty.
    """
    registered_dir = Path(registered_dir)
    test = read_split(split_path)["test"]
    if not test:
        raise ValueError(f"{split_path}: the test split is empty; raise crop fractions or add pairs")
    pairs, _ = find_pairs(registered_dir / "ir", registered_dir / "vi")
    by_stem = {p.stem: p for p in pairs}
    missing = sorted(set(test) - set(by_stem))
    if missing:
        raise FileNotFoundError(f"{registered_dir}: no registered IR/visible images for test pairs {missing[:5]}")
    names = sorted(test)[: max_pairs or None]
    return [{"name": n, "ir": str(by_stem[n].ir), "vi": str(by_stem[n].vi)} for n in names]


def test_set_record(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Identify an evaluated test set: ``{"digest", "pairs"}``.

    ``digest`` is the SHA-256 of the sorted pair ids with the names and byte sizes of their
    registered image files: two evaluations with the same digest scored the same pairs (a
    re-registration that changes a file's size changes it too), so their means can be compared.
    """
    entries = sorted(
        [r["name"], Path(r["ir"]).name, Path(r["ir"]).stat().st_size, Path(r["vi"]).name, Path(r["vi"]).stat().st_size]
        for r in rows
    )
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"digest": digest, "pairs": [e[0] for e in entries]}


def _unpack(buf: bytes, h: int, w: int, c: int) -> np.ndarray:
    img = np.frombuffer(buf, dtype=np.uint8).copy()  # writable: torch.from_numpy warns on read-only memory
    return img.reshape((h, w) if c == 1 else (h, w, c))


# --------------------------------------------------------------------------------------------
# Fusion methods


def fuse_average(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """Pixel-average baseline.

    Args:
        ir: ``uint8`` (H, W).
        vi: ``uint8`` BGR (H, W, 3) or gray (H, W).

    Returns:
        ``uint8`` like ``vi``: ``floor((ir + Y) / 2)`` (integer halving) with the visible chroma.
        Rounding half to even instead (``np.round``) puts every odd sum on an even level and
        lowers EN by about 0.2 on TNO-25 (6.23 against 6.42, the value of the published tables).
    """
    y, crcb = split_luma(vi)
    fused = ((ir.astype(np.uint16) + y.astype(np.uint16)) // 2).astype(np.uint8)
    return merge_luma(fused, crcb)


def fuse_maximum(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """Pixel-maximum baseline: ``max(ir, Y)`` with the visible chroma (shapes as ``fuse_average``)."""
    y, crcb = split_luma(vi)
    return merge_luma(np.maximum(ir, y), crcb)


class FuseBatch:
    """Ray Data callable class: fuses each row with the method it names; models loaded once.

    Every actor loads the networks of ``methods`` in ``__init__`` and reuses them for all the
    batches it receives (the pixel baselines need nothing). The weights travel as bytes with the
    actor's arguments, so the actors also work on the other nodes of a cluster without a shared
    filesystem.

    Args:
        methods: ``{method: (weights file name, weights bytes or their ObjectRef) or None}``
            (``None`` for the pixel baselines); see ``ship_weights``.
        use_gpu: run the networks on CUDA.
    """

    def __init__(self, methods: Mapping[str, tuple[str, Any] | None], use_gpu: bool = False) -> None:
        self.fns: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
        for method, weights in methods.items():
            if method == "average":
                self.fns[method] = fuse_average
            elif method == "maximum":
                self.fns[method] = fuse_maximum
            elif not weights:
                raise ValueError(f"method {method!r} needs a weights file")
            else:
                name, data = weights
                if not isinstance(data, bytes):  # an ObjectRef nested in the tuple: not resolved by Ray

                    data = ray.get(data)
                with tempfile.TemporaryDirectory(prefix="mda-eval-") as tmp:
                    local = Path(tmp) / Path(name).name
                    local.write_bytes(data)
                    try:
                        self.fns[method] = load_fuser(local, use_gpu=use_gpu)
                    except ValueError as exc:  # name the user's file, not the temporary copy
                        raise ValueError(str(exc).replace(str(local), name)) from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Read each pair of the batch (``name``, ``ir``/``vi`` paths) and fuse it with every method.

        Returns:
            One row per (pair, method): ``name``, ``method``, ``h``, ``w``, ``c`` (visible
            channels) and the raw ``uint8`` bytes of ``ir``, ``vi`` and ``fused``.
        """
        out: dict[str, list[Any]] = {k: [] for k in ("name", "method", "h", "w", "c", "ir", "vi", "fused")}
        for name, ir_path, vi_path in zip(batch["name"], batch["ir"], batch["vi"]):
            ir, vi = read_pair(str(ir_path), str(vi_path))
            for method, fn in self.fns.items():
                fused = np.ascontiguousarray(fn(ir, vi), dtype=np.uint8)
                if fused.shape != vi.shape:
                    raise ValueError(f"{method}: fused shape {fused.shape} differs from visible {vi.shape}")
                out["name"].append(str(name))
                out["method"].append(method)
                out["h"].append(ir.shape[0])
                out["w"].append(ir.shape[1])
                out["c"].append(1 if vi.ndim == 2 else vi.shape[2])
                out["ir"].append(ir.tobytes())
                out["vi"].append(vi.tobytes())
                out["fused"].append(fused.tobytes())
        return {k: np.array(v, dtype=object) if k in ("ir", "vi", "fused") else np.array(v) for k, v in out.items()}


def ship_weights(methods: Mapping[str, str | None]) -> dict[str, tuple[str, Any] | None]:
    """Put the weights files of ``methods`` (``{method: path or None}``) in Ray's object store.

    Returns:
        ``{method: (file name, ObjectRef of its bytes) or None}`` for ``FuseBatch``: the actors'
        constructor arguments stay small and every actor fetches the bytes once.
    """

    return {m: (str(path), ray.put(Path(path).read_bytes())) if path else None for m, path in methods.items()}


def load_fuser(weights: str | Path, use_gpu: bool = False) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Load a network (our checkpoint or the authors' file) as ``fuser(ir_u8, vi_u8) -> fused_u8``
    (``pipeline.model.inference.Fuser.from_file``, on the GPU with ``use_gpu`` when CUDA is present)."""

    return Fuser.from_file(weights, device="cuda" if use_gpu else None)


def score_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data function: the metrics of every fused image of a batch (gray, published convention)."""

    cols: dict[str, list[float]] = {m: [] for m in (*METRICS, *DIAGNOSTICS)}
    for buf_ir, buf_vi, buf_f, h, w, c in zip(batch["ir"], batch["vi"], batch["fused"], batch["h"], batch["w"], batch["c"]):
        h, w, c = int(h), int(w), int(c)
        ir = _unpack(buf_ir, h, w, 1)
        vi = _unpack(buf_vi, h, w, c)
        fu = _unpack(buf_f, h, w, c)
        if c == 3:
            vi = cv2.cvtColor(vi, cv2.COLOR_BGR2GRAY)
            fu = cv2.cvtColor(fu, cv2.COLOR_BGR2GRAY)
        values = {**compute_all(ir, vi, fu), **brightness_gaps(ir, vi, fu)}
        for m in cols:
            cols[m].append(float(values[m]))
    out = {k: batch[k] for k in ("method", "name", "fused", "h", "w", "c")}
    out.update({m: np.asarray(v, dtype=np.float64) for m, v in cols.items()})
    return out


def fuse_and_score(
    rows: list[dict[str, str]], methods: Mapping[str, str | None], cfg: EvalConfig, use_gpu: bool
) -> Iterator[dict[str, Any]]:
    """Fuse every pair with every method and score it, as one streaming Ray Data pipeline.

    ``rows`` hold file paths (``list_test_pairs``): the images are read inside the actors, so the
    driver never holds the dataset. ``FuseBatch`` runs in ``cfg.concurrency`` actors (one GPU each with ``use_gpu``) and emits one
    row per (pair, method); the metrics run as parallel tasks.

    Yields:
        One row per (method, pair), in no particular order: ``method``, ``name``, ``h``, ``w``,
        ``c``, ``fused`` bytes and the metrics.
    """

    configure_data_context()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
    with warnings.catch_warnings():  # Ray 2.60 names max_restarts deprecated and offers no other way yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        fused = ds.map_batches(
            FuseBatch,
            fn_constructor_kwargs={"methods": ship_weights(methods), "use_gpu": use_gpu},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            # no actor restarts: a fusion actor that dies fails the stage (it is rerun whole), and Ray
            # then prints no error-level notice about restartable actors with stored arguments
            max_restarts=0,
            **({"num_gpus": 1} if use_gpu else {}),
        )
    scored = fused.map_batches(score_batch, batch_size=cfg.batch_size, batch_format="numpy")
    yield from scored.iter_rows()


# --------------------------------------------------------------------------------------------
# Orchestration
#: Every mean of every method, in the report folder (what promote and ship read).
MEANS_FILE = "means.json"


def resolve_methods(checkpoint: str | Path, official_weights: str | Path | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Decide which methods run: ``({method: weights or None}, {skipped method: reason})``.

    Raises:
        FileNotFoundError: our checkpoint is missing.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"trained checkpoint not found: {checkpoint} (run the train stage)")
    methods: dict[str, str | None] = {"average": None, "maximum": None}
    skipped: dict[str, str] = {}
    if official_weights is None:
        skipped["official"] = "evaluate.official_weights is null"
    elif not Path(official_weights).is_file():
        skipped["official"] = f"authors' weights not found at {official_weights}"
    else:
        methods["official"] = str(official_weights)
    for name, reason in skipped.items():
        log.info("baseline '%s' skipped: %s", name, reason)
    methods["ours"] = str(checkpoint)
    return methods, skipped


def evaluate(
    checkpoint: str | Path,
    registered_dir: str | Path,
    split_path: str | Path,
    out_dir: str | Path,
    metrics_dir: str | Path,
    cfg: EvalConfig,
) -> EvalResult:
    """Fuse the test split with every method, score it and write the reports.

    Must run inside ``pipeline.common.ray_runtime.ray_session`` (or with Ray initialised).

    Args:
        checkpoint: our trained checkpoint (``models/best.pt``).
        registered_dir: registered images (``data/registered``).
        split_path: ``data/patches/split.json``.
        out_dir: folder for ``per_image.csv``, ``table.md``, ``grid.png``, ``test_set.json``,
            ``fused/`` (replaced as a whole once complete).
        metrics_dir: the DVC metrics, one ``<method>.json`` per method of ``METHOD_ORDER`` with the
            headline means (``null`` for a skipped baseline); every mean is in ``eval/means.json``.
        cfg: the ``evaluate`` parameters.

    Returns:
        The per-image rows, the means, the skipped baselines and the files written.
    """

    methods, skipped = resolve_methods(checkpoint, cfg.official_weights)
    rows = list_test_pairs(registered_dir, split_path, cfg.max_pairs)
    for path in filter(None, methods.values()):
        load_model(path)  # fail here, naming the file, rather than inside a Ray actor
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    log.info("evaluating %d test pairs with %s (GPU: %s)", len(rows), ", ".join(methods), use_gpu)

    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        grid_names = {r["name"] for r in rows[: cfg.grid_pairs]}  # rows are sorted by name
        per_image, fused_images = _collect(fuse_and_score(rows, methods, cfg, use_gpu), methods, grid_names, tmp)
        means = mean_per_method(per_image, (*METRICS, *DIAGNOSTICS))
        result = EvalResult(per_image=per_image, means=means, skipped=skipped)
        written = {
            "per_image": write_per_image_csv(tmp / "per_image.csv", per_image, (*METRICS, *DIAGNOSTICS)),
            "table": write_text_atomic(tmp / "table.md", markdown_table(means, (*METRICS, *DIAGNOSTICS), len(rows), skipped)),
            "test_set": write_json(tmp / TEST_SET_FILE, test_set_record(rows)),
            "means": write_json(tmp / MEANS_FILE, means_for_json(means)),
        }
        sources = {r["name"]: read_pair(r["ir"], r["vi"]) for r in rows if r["name"] in grid_names}
        grid = image_grid(sources, fused_images, cfg.grid_pairs, cfg.grid_tile)
        if grid is not None:
            written["grid"] = write_image(tmp / "grid.png", grid)
        written["report"] = write_visual_report(  # report.html, inputs/, plots/<grid pair>/ (DVC image plots)
            tmp, rows, per_image, means, (*METRICS, *DIAGNOSTICS), skipped, plot_pairs=sorted(grid_names))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.paths = {key: out_dir / path.relative_to(tmp) for key, path in written.items()}
    for method in METHOD_ORDER:
        row = means_for_json(means).get(method, {})
        result.paths[f"metrics_{method}"] = write_json(Path(metrics_dir) / f"{method}.json",
                                                       {m: row.get(m) for m in HEADLINE})
    return result


# --------------------------------------------------------------------------------------------
# MLflow


def log_to_run(run_id: str, result: EvalResult) -> None:
    """Log the means (``test_<method>_<metric>``) and every report file to the training run.

    Logs a warning and returns when the run does not exist in the store in force.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        log.warning("MLflow run %s not found (%s); evaluation results not logged", run_id, exc)
        return
    means = {f"test_{method}_{m}": v for method, vals in result.means.items() for m, v in vals.items()}
    log_metrics_batched(client, run_id, means, step=0)
    for path in result.paths.values():
        client.log_artifact(run_id, str(path), artifact_path="eval")
