"""The CPU training recipe: train MDA on RoadScene + MSRS + the TNO pairs outside the test list,
score it on the pinned test list (TNO-25) beside the authors' weights, the pixel average and the
pixel maximum, and write the table.

One command (``mda recipe``, :mod:`pipeline.cli.recipe`; the recipe file ``recipes/cpu.yaml``)
runs it into its own folder (default ``runs/recipe``)::

    <out>/model.pt          the trained checkpoint (pipeline.weights.save_checkpoint format)
    <out>/summary.json      config, data counts, weight spreads, timings, machine, git commit, metrics
    <out>/model_card.json   the model card (what models/pretrained/<name>.json ships)
    <out>/history.json      loss, loss terms, lr and gradient norm every ``train.log_every`` steps
    <out>/table.md          the TNO-25 table (ours, authors' weights, average, maximum, SeAFusion)
    <out>/metrics/<method>.csv   per-image metrics (the columns of ``mda evaluate``)
    <out>/fused/<method>/   the fused test images (8-bit PNG, what the metrics score)

Training reads whole images (no patch table): every step draws ``batch_size`` pairs with the
configured sampling, a random ``patch_size`` crop of each (random flips), and the pair's
image-level adaptive weights. The weights are the paper's complementary-information weights
(:func:`pipeline.complementary.adaptive_weights`) with data-derived scales (median |IR - VIS| of
each statistic over the TRAINING images) and the recipe's temperature. MLflow gets the config,
the weight spreads, the per-step loss/lr/gradient norm and the final metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import torch
import yaml

from pipeline.common.config import flatten
from pipeline.common.machine import describe_machine
from pipeline.common.mlflow_store import configure_mlflow
from pipeline.data.crop import read_test_list
from pipeline.data.images import find_pairs, read_ir, read_visible, split_luma, write_image
from pipeline.data.stats import Normalisation, adaptive_weights, image_statistics
from pipeline.evaluate.score import evaluate_folder
from pipeline.evaluate.stage import fuse_average, fuse_maximum
from pipeline.model.inference import Fuser
from pipeline.model.network import build_model, model_config
from pipeline.model.weights import load_model, save_checkpoint
from pipeline.train.losses import FusionLoss

log = logging.getLogger(__name__)

HEADLINE: tuple[str, ...] = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")
#: SeAFusion's row on TNO-25 as published in CDDFuse's table (reference only, never recomputed).
SEAFUSION: dict[str, float] = {"EN": 7.10, "SD": 44.20, "SF": 12.41, "MI": 2.00, "SCD": 1.72,
                               "VIF": 0.69, "Qabf": 0.51, "SSIM": 0.99}
SAMPLING = ("pairs", "datasets", "area")


# ----------------------------------------------------------------------------------- config
DEFAULTS: dict[str, Any] = {
    "data": {
        "root": "../shared/data",            # folder holding <dataset>/{ir,vi}
        "train_sets": ["RoadScene", "MSRS", "TNO"],
        "test_set": "TNO",
        "test_list": "../shared/data/TNO/subset_CDDFuse_test25.txt",  # pinned to test, never trained on
        "max_pairs": None,                   # smoke runs: at most N training pairs per dataset
        "max_test_pairs": None,              # smoke runs: the first N test pairs
    },
    "weights": {                             # image-level adaptive weights
        "temperature": 4.0,
        "intensity_terms": ["entropy", "std"],
        "detail_terms": ["grad_energy"],
        "log_sigma": 1.0,
    },
    "loss": {},                              # overrides of params.yaml's loss section (dotted or nested)
    "train": {
        "steps": 1500,                       # optimizer steps at most
        "max_seconds": None,                 # training time budget: the schedule runs on max(step/steps,
                                             # elapsed/max_seconds) and training stops when it reaches 1
        "batch_size": 8,
        "patch_size": 64,
        "sampling": "pairs",                # pairs: uniform over pairs; datasets: uniform over datasets, then pairs; area: by pixels
        "lr": 1.0e-3,
        "weight_decay": 1.0e-4,
        "warmup_steps": 30,
        "min_lr_ratio": 0.05,
        "grad_clip": 5.0,
        "init_weights": None,                # checkpoint or the authors' fusion_model.pth to start from
        "seed": 0,
        "threads": None,                     # torch threads; null: all cores
        "log_every": 25,
    },
    "evaluate": {
        "official_weights": "../shared/models/mda_official/fusion_model.pth",
        "ray": True,                         # score through Ray Data (as `mda evaluate`); false: a plain loop
        "baselines": True,                   # also fuse/score the authors' weights, average and maximum
    },
    "experiment": "mda-recipe",
}


#: ``--smoke``: a few pairs and steps, seconds (the recipe's code paths, not its result)
SMOKE: dict[str, Any] = {
    "data": {"max_pairs": 2, "max_test_pairs": 4},
    "train": {"steps": 6, "batch_size": 2, "warmup_steps": 2, "log_every": 2},
    "evaluate": {"ray": False, "official_weights": None},
    "experiment": "mda-recipe-smoke",
}


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), smoke: bool = False) -> dict[str, Any]:
    """The recipe config: :data:`DEFAULTS` < the YAML file < ``--smoke`` < ``KEY=VALUE`` overrides.

    Raises:
        ValueError: an unknown key (typos must not pass silently) or a malformed override.
    """

    cfg = deep_update(DEFAULTS, {})
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        _check_keys(data, DEFAULTS, str(path))
        cfg = deep_update(cfg, data)
    if smoke:
        cfg = deep_update(cfg, SMOKE)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        top = key.split(".")[0]
        if top != "loss":
            node: Any = DEFAULTS
            for part in key.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise ValueError(f"override {key!r}: unknown recipe key")
                node = node[part]
        set_dotted(cfg, key, yaml.safe_load(value))
    return cfg


def _check_keys(data: Mapping[str, Any], ref: Mapping[str, Any], where: str, prefix: str = "") -> None:
    for k, v in data.items():
        if k not in ref:
            raise ValueError(f"{where}: unknown recipe key {prefix}{k!r} (known: {sorted(ref)})")
        if k != "loss" and isinstance(v, Mapping) and isinstance(ref[k], Mapping):
            _check_keys(v, ref[k], where, f"{prefix}{k}.")


def deep_update(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------- data
@dataclass
class PairImages:
    dataset: str
    stem: str
    ir: np.ndarray   # uint8 (H, W)
    vi: np.ndarray   # uint8 (H, W) luma


def collect_pairs(cfg: Mapping[str, Any]) -> tuple[list[tuple[str, Any]], list[Any], list[str]]:
    """``(train [(dataset, Pair)], test [Pair], test_stems)`` from the data config."""

    d = cfg["data"]
    root = Path(d["root"])
    test_stems = read_test_list(d["test_list"])
    test_pairs = {p.stem: p for p in find_pairs(root / d["test_set"] / "ir", root / d["test_set"] / "vi")[0]}
    missing = [s for s in test_stems if s not in test_pairs]
    if missing:
        raise ValueError(f"test list {d['test_list']}: no pair for {missing}")
    train: list[tuple[str, Any]] = []
    for name in d["train_sets"]:
        pairs = find_pairs(root / name / "ir", root / name / "vi")[0]
        if name == d["test_set"]:
            pairs = [p for p in pairs if p.stem not in set(test_stems)]
        if d.get("max_pairs"):
            pairs = pairs[: int(d["max_pairs"])]
        train += [(name, p) for p in pairs]
    test = [test_pairs[s] for s in test_stems]
    if d.get("max_test_pairs"):
        test = test[: int(d["max_test_pairs"])]
    return train, test, test_stems


def load_pairs(pairs: Sequence[tuple[str, Any]]) -> list[PairImages]:
    out = []
    for name, p in pairs:
        ir = read_ir(p.ir)
        y, _ = split_luma(read_visible(p.vi))
        if ir.shape != y.shape:
            log.warning("skipping %s/%s: sizes differ", name, p.stem)
            continue
        out.append(PairImages(name, p.stem, ir, y))
    return out


def image_weights(images: Sequence[PairImages], wcfg: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Image-level adaptive weights (N, 4) in the order int_ir, int_vi, det_ir, det_vi, and the
    spread figures (scales, p5/p50/p95 of w_int_ir and w_det_ir at the chosen temperature and at
    T = 1 for comparison)."""

    terms = sorted(set(wcfg["intensity_terms"]) | set(wcfg["detail_terms"]))
    st_ir = {k: [] for k in terms}
    st_vi = {k: [] for k in terms}
    for im in images:
        a, b = image_statistics(im.ir, wcfg["log_sigma"]), image_statistics(im.vi, wcfg["log_sigma"])
        for k in terms:
            st_ir[k].append(a[k])
            st_vi[k].append(b[k])
    st_ir = {k: np.asarray(v) for k, v in st_ir.items()}
    st_vi = {k: np.asarray(v) for k, v in st_vi.items()}
    scales = {k: max(float(np.median(np.abs(st_ir[k] - st_vi[k]))), 1e-6) for k in terms}
    norm = Normalisation(scales=scales, temperature=float(wcfg["temperature"]),
                         intensity_terms=tuple(wcfg["intensity_terms"]), detail_terms=tuple(wcfg["detail_terms"]))
    spread: dict[str, Any] = {"scales": scales}
    for t in sorted({1.0, 2.0, 4.0, 8.0, float(wcfg["temperature"])}):
        w = adaptive_weights(st_ir, st_vi, norm, temperature=t)
        spread[f"T={t:g}"] = {
            f"w_{k}_ir": [round(float(q), 3) for q in np.percentile(w[f"{k}_ir"], [5, 50, 95])] for k in ("int", "det")
        }
    w = adaptive_weights(st_ir, st_vi, norm)
    arr = np.stack([w["int_ir"], w["int_vi"], w["det_ir"], w["det_vi"]], axis=1).astype(np.float32)
    return arr, spread


class CropSampler:
    """Seeded random crops: ``batch(rng)`` -> (ir, vi, weights) tensors."""

    def __init__(self, images: Sequence[PairImages], weights: np.ndarray, patch: int, batch: int,
                 sampling: str, seed: int) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        self.images = [im for im in images if min(im.ir.shape) >= patch]
        keep = [i for i, im in enumerate(images) if min(im.ir.shape) >= patch]
        if not self.images:
            raise ValueError(f"no training image is at least {patch} px on each side")
        self.weights = weights[keep]
        self.patch, self.batch = patch, batch
        self.rng = np.random.default_rng(seed)
        n = len(self.images)
        if sampling == "pairs":
            p = np.ones(n)
        elif sampling == "area":
            p = np.array([im.ir.size for im in self.images], dtype=np.float64)
        else:
            counts: dict[str, int] = {}
            for im in self.images:
                counts[im.dataset] = counts.get(im.dataset, 0) + 1
            p = np.array([1.0 / counts[im.dataset] for im in self.images])
        self.p = p / p.sum()

    def next(self):
        idx = self.rng.choice(len(self.images), size=self.batch, p=self.p)
        s = self.patch
        irs, vis = [], []
        for i in idx:
            im = self.images[i]
            h, w = im.ir.shape
            y, x = int(self.rng.integers(0, h - s + 1)), int(self.rng.integers(0, w - s + 1))
            a, b = im.ir[y:y + s, x:x + s], im.vi[y:y + s, x:x + s]
            if self.rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
            irs.append(a)
            vis.append(b)
        ir = torch.from_numpy(np.stack(irs)[:, None].astype(np.float32) / 255.0)
        vi = torch.from_numpy(np.stack(vis)[:, None].astype(np.float32) / 255.0)
        w = self.weights[idx]
        weights = {"int_ir": torch.from_numpy(w[:, 0]), "int_vi": torch.from_numpy(w[:, 1]),
                   "det_ir": torch.from_numpy(w[:, 2]), "det_vi": torch.from_numpy(w[:, 3])}
        return ir, vi, weights


def progress(step: int, steps: int, elapsed: float, max_seconds: float | None) -> float:
    """Fraction of training done: ``step / steps``, or the elapsed share of ``max_seconds`` if larger."""
    p = step / max(1, steps)
    if max_seconds:
        p = max(p, elapsed / max_seconds)
    return min(1.0, p)


def lr_factor(step: int, done: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup`` steps, then cosine decay over the progress ``done``
    (0 -> 1) down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


# ----------------------------------------------------------------------------------- train
def build_loss(cfg: Mapping[str, Any], params_loss: Mapping[str, Any]):
    loss_cfg = deep_update(params_loss, {})
    for k, v in cfg["loss"].items():
        if isinstance(v, Mapping):
            loss_cfg = deep_update(loss_cfg, {k: v})
        else:
            set_dotted(loss_cfg, k, v)
    return FusionLoss.from_params(loss_cfg), loss_cfg


def train(cfg: Mapping[str, Any], images: Sequence[PairImages], weights: np.ndarray,
          params: Mapping[str, Any], out: Path, mlflow_run: Any = None):

    t = cfg["train"]
    torch.manual_seed(int(t["seed"]))
    if t.get("threads"):
        torch.set_num_threads(int(t["threads"]))
    name, args = model_config(params["model"])
    if t.get("init_weights"):
        model, info = load_model(t["init_weights"])
        name, args = info["name"], info["args"]
        log.info("init from %s (%s)", t["init_weights"], info["kind"])
    else:
        model = build_model(name, **args)
    model.train()
    loss_fn, loss_cfg = build_loss(cfg, params["loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    steps, warm, min_ratio = int(t["steps"]), int(t["warmup_steps"]), float(t["min_lr_ratio"])
    max_seconds = float(t["max_seconds"]) if t.get("max_seconds") else None
    base_lr = float(t["lr"])
    sampler = CropSampler(images, weights, int(t["patch_size"]), int(t["batch_size"]), t["sampling"], int(t["seed"]))
    need_feats = "feature" in loss_fn.term_weights
    history = []
    t0 = time.time()
    clip = float(t["grad_clip"])
    clipped = 0
    run_loss = None
    step = 0
    while True:
        done = progress(step, steps, time.time() - t0, max_seconds)
        if done >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = base_lr * lr_factor(step, done, warm, min_ratio)
        ir, vi, w = sampler.next()
        if need_feats:
            fused, feats = model(ir, vi, return_features=True)
        else:
            fused, feats = model(ir, vi), None
        loss, terms = loss_fn(fused, ir, vi, w, feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        clipped += int(clip > 0 and float(gn) > clip)
        opt.step()
        lv = loss.item()
        run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
        if step % int(t["log_every"]) == 0 or step == steps - 1:
            rec = {"step": step, "loss": lv, "loss_ema": run_loss, "grad_norm": float(gn),
                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1),
                   **{f"term_{k}": float(v) for k, v in terms.items()}}
            history.append(rec)
            log.info("step %d/%d loss %.4f (ema %.4f) |g| %.3f lr %.2e %.0fs", step, steps, lv, run_loss,
                     float(gn), rec["lr"], rec["seconds"])
            if mlflow_run is not None:

                mlflow.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
        step += 1
    seconds = time.time() - t0
    log.info("trained %d steps in %.0f s (%d clipped at %.1f)", step, seconds, clipped, clip)
    ckpt = save_checkpoint(out / "model.pt", model, name, args,
                           extra={"postprocess": "clip", "recipe": True, "steps": step,
                                  "train_seconds": round(seconds, 1)})
    return ckpt, {"train_seconds": round(seconds, 1), "train_steps": step, "clipped_steps": clipped, "history": history,
                  "loss": loss_cfg, "final_loss_ema": run_loss}


# ----------------------------------------------------------------------------------- evaluate
def _fuse_folder(method: str, pairs: Sequence[Any], dest: Path, weights: str | None = None,
                 postprocess: str | None = None) -> None:

    dest.mkdir(parents=True, exist_ok=True)
    fuser = None
    if weights is not None:

        fuser = Fuser.from_file(weights, postprocess=postprocess)
    for p in pairs:
        ir = read_ir(p.ir)
        vis = read_visible(p.vi)
        if fuser is not None:
            out = fuser(ir, vis)
        else:  # the evaluate stage's own baselines

            out = (fuse_average if method == "average" else fuse_maximum)(ir, vis)
        write_image(dest / f"{p.stem}.png", out)


def table_markdown(results: Mapping[str, Mapping[str, float]], n_pairs: int) -> str:
    cols = list(HEADLINE)
    head = f"TNO-25 ({n_pairs} pairs), means; our evaluator (`mda evaluate`, CDDFuse conventions). " \
           "Bold: best of the computed rows. SeAFusion: published row (CDDFuse's table), not recomputed.\n\n"
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    best = {m: max(r[m] for r in results.values()) for m in cols}
    fmt = lambda m, v: f"{v:.2f}" if m != "SSIM" else f"{v:.3f}"  # noqa: E731
    for name, r in results.items():
        cells = [(f"**{fmt(m, r[m])}**" if r[m] == best[m] else fmt(m, r[m])) for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| SeAFusion (published) | " + " | ".join(fmt(m, SEAFUSION[m]) for m in cols) + " |")
    ours = results.get("ours")
    if ours is not None:
        lines.append("")
        for other in [k for k in results if k != "ours"] + ["SeAFusion"]:
            ref = SEAFUSION if other == "SeAFusion" else results[other]
            won = [m for m in cols if ours[m] > ref[m]]
            lines.append(f"- ours beats {other} on {len(won)}/8: {', '.join(won) or '-'}")
    return head + "\n".join(lines) + "\n"


def evaluate(cfg: Mapping[str, Any], test: Sequence[Any], ckpt: Path | None, out: Path) -> dict[str, dict[str, float]]:
    """Fuse the test pairs with each method into ``out/fused/<slug>`` and score each folder with
    :func:`pipeline.metrics.evaluate_folder` (what ``mda evaluate`` runs)."""

    d = cfg["data"]
    src = Path(d["root"]) / d["test_set"]

    torch.set_num_threads(os.cpu_count() or 1)
    methods: list[tuple[str, str | None, str | None]] = []
    if ckpt is not None:
        methods.append(("ours", str(ckpt), None))
    off = cfg["evaluate"].get("official_weights") if cfg["evaluate"].get("baselines", True) else None
    if off and Path(off).is_file():
        methods.append(("authors' weights", off, None))
    elif off:
        log.warning("authors' weights not found: %s (row skipped)", off)
    if cfg["evaluate"].get("baselines", True):
        methods += [("average", None, None), ("maximum", None, None)]
    results: dict[str, dict[str, float]] = {}
    for name, weights, pp in methods:
        slug = {"authors' weights": "official"}.get(name, name)
        t0 = time.time()
        dest = out / "fused" / slug
        if dest.exists():

            shutil.rmtree(dest)
        _fuse_folder(name, test, dest, weights, pp)
        df = evaluate_folder(src / "ir", src / "vi", dest, parallel=bool(cfg["evaluate"].get("ray", True)))
        if len(df) != len(test) or df.attrs.get("skipped"):
            raise RuntimeError(f"{name}: scored {len(df)} of {len(test)} test images: {df.attrs.get('skipped')}")
        (out / "metrics").mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "metrics" / f"{slug}.csv", index=False)
        results[name] = {m: float(df[m].mean()) for m in df.columns if m != "name"}
        log.info("%s: %s (%.0fs)", name, {m: round(results[name][m], 3) for m in HEADLINE}, time.time() - t0)
    return results


# ----------------------------------------------------------------------------------- run
def git_commit() -> str | None:
    """HEAD of the repository in the current folder, ``+dirty`` when tracked files differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


#: recipe train key -> params.yaml train key, for the card's "params differing from params.yaml"
TRAIN_KEYS = {"batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
              "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio", "grad_clip": "grad_clip",
              "seed": "seed", "init_weights": "init_weights"}


def params_diff(cfg: Mapping[str, Any], params: Mapping[str, Any], loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": {"params_yaml": value, "recipe": value}}`` for every setting of the
    recipe that differs from ``params.yaml`` (recipe-only settings have ``params_yaml: null``)."""

    diff: dict[str, Any] = {}
    base, ours = flatten({"loss": params.get("loss", {})}), flatten({"loss": loss_cfg})
    for k in sorted(set(base) | set(ours)):
        if base.get(k) != ours.get(k):
            diff[k] = {"params_yaml": base.get(k), "recipe": ours.get(k)}
    ptrain = params.get("train", {})
    for k, v in cfg["train"].items():
        if k in ("threads", "log_every"):
            continue
        pk = TRAIN_KEYS.get(k)
        pv = ptrain.get(pk) if pk else None
        if pv != v:
            diff[f"train.{pk or k}"] = {"params_yaml": pv, "recipe": v}
    pst = params.get("stats", {})
    for k in ("temperature", "intensity_terms", "detail_terms", "log_sigma"):
        if pst.get(k) != cfg["weights"][k]:
            diff[f"stats.{k}"] = {"params_yaml": pst.get(k), "recipe": cfg["weights"][k]}
    return diff


def model_card(summary: Mapping[str, Any], cfg: Mapping[str, Any], params: Mapping[str, Any], out: Path,
               command: str) -> dict[str, Any]:
    """The model card of ``out/model.pt`` (see models/pretrained/README section of the README)."""

    ckpt = Path(summary["checkpoint"])
    card = {
        "name": "mda-cpu-recipe",
        "command": command,
        "output": str(ckpt),
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "model": {"name": "mda", "args": params.get("model", {}).get("args", {})},
        "postprocess": "clip",
        "data": summary["data"],
        "params_differing_from_params_yaml": params_diff(cfg, params, summary["loss"]),
        "train_steps": summary["train_steps"],
        "train_max_steps": cfg["train"]["steps"],
        "train_max_seconds": cfg["train"].get("max_seconds"),
        "train_seconds": summary["train_seconds"],
        "total_seconds": summary.get("total_seconds"),
        "machine": summary["machine"],
        "git_commit": summary["git_commit"],
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "weight_spread": summary.get("weight_spread"),
        "tno25": summary["tno25"]["ours"],
        "tno25_baselines": {k: v for k, v in summary["tno25"].items() if k != "ours"},
    }
    return card


def run_recipe(cfg: Mapping[str, Any], params: Mapping[str, Any], out: str | Path, evaluate_only: Path | None = None,
               command: str | None = None) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    train_pairs, test, test_stems = collect_pairs(cfg)
    leak = {p.stem for n, p in train_pairs if n == cfg["data"]["test_set"]} & set(test_stems)
    assert not leak, leak
    summary: dict[str, Any] = {"config": cfg, "git_commit": git_commit(), "machine": describe_machine()}

    configure_mlflow(experiment=cfg["experiment"])
    with mlflow.start_run(run_name=out.name) as run:

        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg).items()})
        if evaluate_only is None:
            t0 = time.time()
            images = load_pairs(train_pairs)
            weights, spread = image_weights(images, cfg["weights"])
            counts: dict[str, int] = {}
            for im in images:
                counts[im.dataset] = counts.get(im.dataset, 0) + 1
            summary["data"] = {"train_pairs": counts, "train_pairs_total": len(images),
                               "test_pairs": len(test), "test_list": cfg["data"]["test_list"]}
            summary["weight_spread"] = spread
            summary["load_seconds"] = round(time.time() - t0, 1)
            log.info("data %s, weight spread %s", counts, spread)
            mlflow.log_dict(spread, "weight_spread.json")
            ckpt, info = train(cfg, images, weights, params, out, run)
            summary.update({k: v for k, v in info.items() if k != "history"})
            (out / "history.json").write_text(json.dumps(info["history"], indent=1))
        else:
            ckpt = evaluate_only
        results = evaluate(cfg, test, ckpt, out)
        summary["tno25"] = results
        summary["checkpoint"] = str(ckpt)
        summary["mlflow_run_id"] = run.info.run_id
        table = table_markdown(results, len(test))
        (out / "table.md").write_text(table)
        mlflow.log_metrics({f"test_{m}": v for m, v in results.get("ours", {}).items()})
        mlflow.log_artifact(str(out / "table.md"))
        summary["total_seconds"] = round(time.time() - t_all, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if evaluate_only is None:
            card = model_card(summary, cfg, params, out, command or "mda recipe")
            (out / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
            mlflow.log_artifact(str(out / "model_card.json"))
    print(table)
    return summary
