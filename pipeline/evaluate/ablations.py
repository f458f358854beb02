"""The paper's ablations as DVC experiments: the variant grid, its commands, and the table and
chart made from ``dvc exp show --json``.

Each variant is a set of ``dvc exp run -S key=value`` overrides on top of ``GRID_COMMON`` (the
shared data and training budget: same seed, same number of optimiser steps for every variant). The
grid runs through DVC's own queue (``dvc exp run --queue`` per variant, then ``dvc queue start``);
``mda ablations run`` prints and runs exactly those commands. ``mda ablations report`` reads the
experiments back (``dvc exp show --json``) and writes ``docs/ablations.md`` and
``docs/ablations.png``.

Everything here except :func:`complexity`, :func:`write_chart` and :func:`build_raw_folder` is a
pure function of its arguments (unit-tested on a fake ``dvc exp show --json`` document).

The "full" model of the grid is the pipeline's default network and loss section
(``loss.profile: ours``: max targets, L1 intensity, the gradient weight of ``params.yaml``, 2) with the paper's
patch-level and style terms switched on, so that each switch removes one component the paper
claims. The fusion-point feature term stays off (as in ``params.yaml``): it is defined on the five
fusion points, which the reduced-scale network does not have.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data.gather import GatherConfig, gather
from pipeline.evaluate.metrics import HEADLINE
from pipeline.model.network import build_model, model_config

#: Experiment names are ``<EXP_PREFIX><variant>[-<tag>]``.
EXP_PREFIX = "abl-"
#: Input of the FLOP count: one forward pass on one 256x256 pair.
FLOP_INPUT = (1, 1, 256, 256)


@dataclass(frozen=True)
class Variant:
    """One cell of the grid.

    Attributes:
        name: short name (letters, digits, ``_``), also the experiment name after ``EXP_PREFIX``.
        overrides: ``params.yaml`` key -> value, passed as ``dvc exp run -S key=value``.
        tests: the paper's claim this variant checks (one line, for the table).
    """

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    tests: str = ""


#: The ablation grid. Edit here: add, drop or change a variant (its overrides are -S settings).
VARIANTS: tuple[Variant, ...] = (
    Variant("full", {}, "the full model: dual attention, 3 scales, adaptive weights, image+patch terms, style term, max targets"),
    Variant("add", {"model.args.fusion": "add"}, "dual-attention fusion vs elementwise sum"),
    Variant("concat", {"model.args.fusion": "concat"}, "dual-attention fusion vs concatenation + 1x1 conv"),
    Variant("single_scale", {"model.args.scales": 1}, "multi-scale (1x+2x+4x) vs 1x only"),
    # stats.weighting=fixed: every image/patch weight of the stats stage and every per-pixel patch
    # map of the loss is 0.5 (pipeline.train.losses.loss_section)
    Variant("fixed_weights", {"stats.weighting": "fixed"},
            "adaptive complementary-information weights vs 0.5/0.5"),
    Variant("no_patch", {"loss.patch.enabled": False}, "image+patch-level loss vs image level only"),
    Variant("no_style", {"loss.style.enabled": False}, "VGG style term vs none"),
    Variant("blend_targets", {"loss.intensity.target": "blend", "loss.gradient.target": "blend"},
            "max targets (ours) vs the paper's weighted-blend targets"),
)

#: Overrides shared by every variant: the data (filled in by ``grid_common``), the equal budget
#: (3 epochs x 640 patches / (4 x 2 workers) = 240 optimiser steps, seed 2024) and the full model's
#: loss terms. Measured on the shared 2-core machine: 2.0-2.2 CPU s per step of the full network
#: and loss (8 patches of 64x64), i.e. about 5-6 minutes of training per variant on 2 calm cores,
#: plus Ray/MLflow start-up, validation and the TNO-25 evaluation: about 9-10 minutes per variant,
#: about 80 minutes for the 8 (README "Ablations").
GRID_BUDGET: dict[str, Any] = {
    # register.align stays 'check' (pixels written as decoded): DVC's -S writes YAML 1.2, where a
    # plain `off` is a string, but params.yaml is read as YAML 1.1, where it is the boolean false
    "crop.patch_size": 64,
    "crop.stride": 128,                 # ~5.7k patches over the 288 training/validation pairs
    "train.epochs": 3,
    "train.max_train_patches": 640,     # a seeded random subset (train.seed), the same for every variant
    "train.batch_size": 4,
    "train.num_workers": 2,
    "train.seed": 2024,
    "train.init_weights": None,         # every variant from the same random init (a pretrained full model
                                        # would not fit the reduced networks, and would favour the full one)
    "train.val_max_pairs": 4,
    "evaluate.official_weights": None,  # the authors' weights are not part of the ablation
    "evaluate.max_pairs": None,
    "loss.profile": "ours",
    "loss.patch.enabled": True,
    "loss.style.enabled": True,
}

#: The smoke grid (``mda ablations run --smoke``): two variants, a handful of steps, demo data.
SMOKE_VARIANTS: tuple[str, ...] = ("full", "add")
SMOKE_BUDGET: dict[str, Any] = {
    "register.raw_dir": "data/demo", "crop.test_list": None, "crop.stride": 64,
    "train.epochs": 1, "train.max_train_patches": 16, "train.batch_size": 4, "train.num_workers": 1,
    "train.init_weights": None,  # a variant's network need not fit the shipped model
    "train.val_max_pairs": 1, "evaluate.max_pairs": 2,
}


# ----------------------------------------------------------------------------- the grid
def format_value(value: Any) -> str:
    """A value as DVC's ``-S`` expects it (YAML): ``null``, ``true``/``false``, numbers, strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str):

        try:
            same = yaml.safe_load(text) == value
        except yaml.YAMLError:
            same = False
        if not same:  # 'off', 'yes', '1e3', '' ...: YAML would read another type
            return "'" + text.replace("'", "''") + "'"
    return text


def select_variants(names: Sequence[str] | None, variants: Sequence[Variant] = VARIANTS) -> list[Variant]:
    """The variants named (all when ``names`` is empty/None), in grid order; unknown names raise."""
    if not names:
        return list(variants)
    known = {v.name: v for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown} (known: {list(known)})")
    return [v for v in variants if v.name in set(names)]


def grid_common(raw_dir: str | None, test_list: str | None, smoke: bool = False) -> dict[str, Any]:
    """``GRID_BUDGET`` with the data (``register.raw_dir``, ``crop.test_list``), or the smoke budget.

    Paths are made absolute: queued experiments run in a temporary copy of the repository, where a
    path relative to the repository (``../shared/...``) would point elsewhere.
    """
    common = dict(GRID_BUDGET)
    if smoke:
        common.update(SMOKE_BUDGET)
        return common
    if raw_dir is None:
        raise ValueError("the grid needs a raw folder (ir/ and vi/): build it with `mda ablations data`")
    common["register.raw_dir"] = os.path.abspath(raw_dir)
    common["crop.test_list"] = os.path.abspath(test_list) if test_list else None
    return common


def exp_name(variant: str, tag: str | None = None) -> str:
    """The DVC experiment name of a variant."""
    return f"{EXP_PREFIX}{variant}" + (f"-{tag}" if tag else "")


def grid_commands(variants: Sequence[Variant], common: Mapping[str, Any], tag: str | None = None,
                  jobs: int = 1) -> list[list[str]]:
    """The DVC commands of the grid: one ``dvc exp run --queue -n NAME -S ...`` per variant, then
    ``dvc queue start -j JOBS``. A variant's own overrides win over ``common``."""
    cmds = []
    for v in variants:
        settings = {**common, **v.overrides}
        cmd = ["dvc", "exp", "run", "--queue", "-n", exp_name(v.name, tag)]
        for key, value in settings.items():
            cmd += ["-S", f"{key}={format_value(value)}"]
        cmds.append(cmd)
    cmds.append(["dvc", "queue", "start", "-j", str(jobs)])
    return cmds


def shell_line(cmd: Sequence[str]) -> str:
    """One command as a copy-pasteable shell line."""

    return " ".join(shlex.quote(c) for c in cmd)


# ----------------------------------------------------------------------------- reading dvc exp show --json
@dataclass
class ExpRecord:
    """One experiment of ``dvc exp show --json``.

    Attributes:
        name: experiment name (``abl-add``), rev: its commit, baseline: the commit it is based on.
        params: ``params.yaml`` (nested), metrics: metrics file -> its content.
        timestamp: DVC's timestamp string.
        failed: DVC reports an error for the run (its metrics are missing or stale).
    """

    name: str
    rev: str
    baseline: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    timestamp: str | None = None
    failed: bool = False


def _files_data(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"file": {"data": {...}}}`` -> ``{"file": {...}}`` (DVC 3 layout; errors dropped)."""
    out = {}
    for path, entry in (node or {}).items():
        if isinstance(entry, Mapping) and isinstance(entry.get("data"), Mapping):
            out[path] = dict(entry["data"])
    return out


def parse_exp_show(doc: Any) -> list[ExpRecord]:
    """The experiments of a ``dvc exp show --json`` document (DVC 3: a list of baseline entries,
    each with ``experiments: [{"name", "revs": [{"rev", "name", "data": {"params", "metrics",
    "timestamp"}}]}]``). Baselines themselves (workspace, commits) are not experiments and are
    skipped; failed experiments (no data) too."""
    records: list[ExpRecord] = []
    for base in doc if isinstance(doc, list) else []:
        baseline = str(base.get("rev", ""))
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name") or ""
                if not data or not name:
                    continue
                state = ((exp.get("executor") or {}).get("state") or "").lower()
                records.append(ExpRecord(
                    name=str(name), rev=str(rev.get("rev") or data.get("rev") or ""), baseline=baseline,
                    params=_files_data(data.get("params")).get("params.yaml", {}),
                    metrics=_files_data(data.get("metrics")), timestamp=data.get("timestamp"),
                    failed=bool(rev.get("error")) or state == "failed",
                ))
    return records


def variant_of(name: str, variants: Sequence[str]) -> str | None:
    """The variant of an experiment name ``abl-<variant>[-<tag>]`` (longest match), else None."""
    if not name.startswith(EXP_PREFIX):
        return None
    rest = name[len(EXP_PREFIX):]
    for v in sorted(variants, key=len, reverse=True):
        if rest == v or rest.startswith(v + "-"):
            return v
    return None


def pick_records(records: Sequence[ExpRecord], variants: Sequence[str], tag: str | None = None) -> dict[str, ExpRecord]:
    """Variant -> its experiment (with ``tag``: only ``abl-<variant>-<tag>``; without: the newest
    ``abl-<variant>[-*]`` by timestamp). Failed experiments are never picked."""
    out: dict[str, ExpRecord] = {}
    for r in records:
        v = variant_of(r.name, variants)
        if v is None or r.failed or (tag is not None and r.name != exp_name(v, tag)):
            continue
        if v not in out or (r.timestamp or "") > (out[v].timestamp or ""):
            out[v] = r
    return out


def get_dotted(tree: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class Row:
    """One line of the table."""

    variant: str
    exp: str
    rev: str
    means: dict[str, float | None]
    train_s: float | None
    params: int | None = None
    gflops: float | None = None


def table_rows(picked: Mapping[str, ExpRecord], variants: Sequence[str], method: str = "ours") -> list[Row]:
    """Rows in grid order for the variants that have an experiment: the ``method`` means of
    ``metrics/eval/<method>.json`` (``metrics/eval.json`` in experiments of before that layout) and
    ``fit_time_s`` of ``metrics/train.json``."""
    rows = []
    for v in variants:
        r = picked.get(v)
        if r is None:
            continue
        means = (r.metrics.get(f"metrics/eval/{method}.json")
                 or (r.metrics.get("metrics/eval.json") or {}).get(method) or {})
        train = r.metrics.get("metrics/train.json") or {}
        rows.append(Row(v, r.name, r.rev, {m: means.get(m) for m in HEADLINE}, train.get("fit_time_s")))
    return rows


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _delta(x: float | None, ref: float | None) -> str:
    if x is None or ref is None:
        return ""
    d = x - ref
    mark = " **+**" if d > 0 else ""
    return f" ({d:+.3f}{mark})"


def markdown_report(rows: Sequence[Row], variants: Sequence[Variant], *, command: str, commit: str,
                    machine: str = "", date: str = "", test_desc: str | None = None, notes: Sequence[str] = ()) -> str:
    """``docs/ablations.md``: one row per variant, the 8 headline means (difference to the full
    model in parentheses, a bold **+** where the variant beats it), params, GFLOPs, training
    seconds, and how many of the 8 metrics beat the full model."""
    by_name = {v.name: v for v in variants}
    full = next((r for r in rows if r.variant == "full"), None)
    lines = ["# Ablations", ""]
    test = test_desc or "the pinned TNO test pairs (TNO-25)"
    lines += [f"Means over {test} of the 8 headline metrics (CDDFuse conventions; higher is better for all), "
              "one DVC experiment per variant, equal budget (same seed, same number of optimiser steps). "
              "In parentheses: the difference to the full model; **+** marks a variant that beats it. "
              "GFLOPs: one forward pass on a 1x1x256x256 pair.", ""]
    head = ["variant", *HEADLINE, "beats full", "params", "GFLOPs", "train s", "experiment"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r.variant]
        wins = 0
        for m in HEADLINE:
            ref = full.means.get(m) if full and r is not full else None
            cells.append(_fmt(r.means.get(m)) + _delta(r.means.get(m), ref))
            if ref is not None and r.means.get(m) is not None and r.means[m] > ref:
                wins += 1
        cells.append("-" if r is full or full is None else f"{wins}/8")
        cells += [f"{r.params:,}" if r.params is not None else "n/a", _fmt(r.gflops, 2), _fmt(r.train_s, 0),
                  f"`{r.exp}` ({r.rev[:7]})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| variant | overrides (on top of the grid's common settings) | tests |", "|---|---|---|"]
    for r in rows:
        v = by_name.get(r.variant)
        over = ", ".join(f"`{k}={format_value(x)}`" for k, x in (v.overrides if v else {}).items()) or "(none)"
        lines.append(f"| {r.variant} | {over} | {v.tests if v else ''} |")
    missing = [v.name for v in variants if v.name not in {r.variant for r in rows}]
    if missing:
        lines += ["", f"No experiment found for: {', '.join(missing)}."]
    beaten = []
    if full is not None:
        for r in rows:
            better = [m for m in HEADLINE if r is not full and r.means.get(m) is not None
                      and full.means.get(m) is not None and r.means[m] > full.means[m]]
            if better:
                beaten.append(f"- **{r.variant}** beats the full model on {len(better)}/8: {', '.join(better)}.")
    lines += ["", "## Where a variant beats the full model", ""]
    lines += beaten or ["- None: the full model is best or level on every metric."]
    lines += ["", "## Provenance", "", f"- command: `{command}`", f"- git commit: `{commit}`"]
    if machine:
        lines.append(f"- machine: {machine}")
    if date:
        lines.append(f"- report written: {date}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def relative_differences(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Variant -> metric -> difference to the full model in percent of the full model's value
    (the chart's bars); variants or metrics without a value are left out."""
    full = next((r for r in rows if r.variant == "full"), None)
    out: dict[str, dict[str, float]] = {}
    if full is None:
        return out
    for r in rows:
        if r is full:
            continue
        d = {}
        for m in HEADLINE:
            x, ref = r.means.get(m), full.means.get(m)
            if x is not None and ref not in (None, 0):
                d[m] = 100.0 * (x - ref) / abs(ref)
        out[r.variant] = d
    return out


def write_chart(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """``docs/ablations.png``: one panel per headline metric, one bar per variant: difference to
    the full model in percent (above 0: the variant is better)."""

    matplotlib.use("Agg")

    rel = relative_differences(rows)
    names = list(rel)
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5), sharey=False)
    colours = plt.get_cmap("tab10").colors
    for ax, m in zip(axes.ravel(), HEADLINE):
        vals = [rel[n].get(m, 0.0) for n in names]
        ax.bar(range(len(names)), vals, color=[colours[i % 10] for i in range(len(names))])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(m)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=55, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("% vs full model")
    axes[1, 0].set_ylabel("% vs full model")
    fig.suptitle(title or "Ablations: difference to the full model (TNO test means; > 0 = better than full)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- model cost
def complexity(model_args: Mapping[str, Any], name: str = "mda", size: Sequence[int] = FLOP_INPUT) -> tuple[int, float]:
    """``(parameters, GFLOPs)`` of a network: FLOPs of one forward pass on an IR/visible pair of
    ``size`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
    products, 2 FLOPs per multiply-add; element-wise operations are not counted)."""

    net = build_model(name, **dict(model_args)).eval()
    params = sum(p.numel() for p in net.parameters())
    x = torch.zeros(*size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, x)
    return params, counter.get_total_flops() / 1e9


def model_args_of(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, args)`` of the ``model:`` section of an experiment's params (validated)."""

    return model_config(dict(params.get("model") or {}))


# ----------------------------------------------------------------------------- data
def build_raw_folder(out: str | Path, root: str | Path, datasets: Sequence[str]) -> dict[str, int]:
    """The grid's raw folder: ``out/{ir,vi}/`` links to every pair of ``root/<dataset>/{ir,vi}``
    (``pipeline.data.gather``, as the CPU recipe's gather stage). Returns dataset -> pairs linked."""

    return gather(GatherConfig(root=str(root), datasets=tuple(datasets)), out)


def recipe_data(path: str | Path) -> dict[str, Any]:
    """The data of a recipe's ``params.yaml`` (``recipes/cpu/params.yaml``): ``root``,
    ``train_sets`` (its ``gather.datasets``), ``test_set`` (the dataset of its ``crop.test_list``)
    and ``test_list``, with paths made relative to the current folder."""

    path = Path(path)
    params = yaml.safe_load(path.read_text()) or {}
    gather_cfg, crop = params.get("gather") or {}, params.get("crop") or {}
    if not gather_cfg.get("root") or not gather_cfg.get("datasets") or not crop.get("test_list"):
        raise ValueError(f"{path}: needs gather.root, gather.datasets and crop.test_list")
    here = path.parent

    def rel(p: str) -> str:
        return os.path.relpath(os.path.normpath(here / p)) if not os.path.isabs(p) else p

    test_list = rel(crop["test_list"])
    return {"root": rel(gather_cfg["root"]), "train_sets": list(gather_cfg["datasets"]),
            "test_set": Path(test_list).parent.name, "test_list": test_list}


def load_exp_show(text: str) -> list[ExpRecord]:
    """``parse_exp_show`` of the JSON text."""
    return parse_exp_show(json.loads(text))


def dataset_list(data: Mapping[str, Any]) -> list[str]:
    """The datasets of the raw folder: the training sets plus the test set."""
    sets: Iterable[str] = list(data["train_sets"]) + [data["test_set"]]
    return list(dict.fromkeys(sets))
