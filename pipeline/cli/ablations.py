"""``mda ablations``: the paper's ablations as one DVC experiment grid, and its table and chart.

    mda ablations data      # the grid's raw folder: links to the CPU recipe's data (recipes/cpu/params.yaml)
    mda ablations run       # queue one `dvc exp run` per variant, `dvc queue start`, wait, report
    mda ablations report    # dvc exp show --json -> docs/ablations.md + docs/ablations.png
    mda ablations cost      # parameters and GFLOPs of every variant's network

The variants and the shared budget are data in ``pipeline/evaluate/ablations.py`` (``VARIANTS``,
``GRID_BUDGET``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from pipeline.common.machine import describe_machine

log = logging.getLogger(__name__)

DEFAULT_RAW = Path("data/ablation_raw")
DEFAULT_RECIPE = Path("recipes/cpu/params.yaml")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda ablations``."""
    parser = subparsers.add_parser(
        "ablations", help="the paper's ablations as DVC experiments -> docs/ablations.md + .png",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("data", help="build the grid's raw folder (links) from the recipe's datasets")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe whose data: section to use")
    p.add_argument("--out", type=Path, default=DEFAULT_RAW, help="raw folder to write (ir/, vi/ links)")
    p.set_defaults(func=run_data)

    p = sub.add_parser("run", help="queue the grid as DVC experiments, start the queue, wait, report")
    p.add_argument("--variants", nargs="*", default=None, help="subset of the grid (default: all)")
    p.add_argument("--tag", default=None, help="experiment name suffix: abl-<variant>-<tag>")
    p.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="raw folder (built by `data` if missing)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe whose data: section to use")
    p.add_argument("--smoke", action="store_true", help="2 variants, a handful of steps, demo data")
    p.add_argument("--dry-run", action="store_true", help="print the DVC commands, run nothing")
    p.add_argument("--no-wait", action="store_true", help="return after `dvc queue start`")
    p.add_argument("--allow-dirty", action="store_true",
                   help="queue even with uncommitted changes to tracked files (DVC would include them)")
    p.add_argument("--md", type=Path, default=Path("docs/ablations.md"))
    p.add_argument("--png", type=Path, default=Path("docs/ablations.png"))
    p.set_defaults(func=run_grid)

    p = sub.add_parser("report", help="dvc exp show --json -> the Markdown table and the bar chart")
    p.add_argument("--json", type=Path, default=None, help="a saved `dvc exp show --json` (default: run it)")
    p.add_argument("--tag", default=None, help="only experiments abl-<variant>-<tag>")
    p.add_argument("--command", dest="record_command", default=None,
                   help="the grid command to record (default: `mda ablations run`)")
    p.add_argument("--md", type=Path, default=Path("docs/ablations.md"))
    p.add_argument("--png", type=Path, default=Path("docs/ablations.png"))
    p.set_defaults(func=run_report)

    p = sub.add_parser("cost", help="parameters and GFLOPs (1x1x256x256) of each variant's network")
    p.set_defaults(func=run_cost)
    return parser


def _raw_folder(raw: Path, recipe: Path) -> tuple[Path, str]:
    from pipeline.evaluate import ablations as ab

    data = ab.recipe_data(recipe)
    if not (raw / "ir").is_dir():
        counts = ab.build_raw_folder(raw, data["root"], ab.dataset_list(data))
        log.info("ablations: raw folder %s: %s", raw, counts)
    return raw, str(data["test_list"])


def run_data(args: argparse.Namespace) -> int:
    from pipeline.evaluate import ablations as ab

    data = ab.recipe_data(args.recipe)
    counts = ab.build_raw_folder(args.out, data["root"], ab.dataset_list(data))
    print(f"{args.out}: {sum(counts.values())} pairs linked ({counts}); test list {data['test_list']}")
    return 0


def _dirty() -> str:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return out.stdout.strip()


#: ``dvc queue status`` may fail now and then (a lock held by a running experiment): so many
#: failures in a row end the wait with its error.
QUEUE_STATUS_ATTEMPTS = 10


def wait_for_queue(poll_s: float = 20.0, attempts: int = QUEUE_STATUS_ATTEMPTS) -> float:
    """Wait until the DVC queue has no queued or running experiment; returns the seconds waited.

    A failed ``dvc queue status`` counts as busy (it used to end the wait, and the report then
    missed the experiments still running); ``attempts`` failures in a row raise ``RuntimeError``
    with its message.
    """
    t0, failures = time.time(), 0
    while True:
        done = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True)
        if done.returncode != 0:
            failures += 1
            message = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            if failures >= attempts:
                raise RuntimeError(f"`dvc queue status` failed {failures} times in a row: {message[0]}")
            log.warning("ablations: `dvc queue status` failed (%s); still waiting", message[0])
        else:
            failures = 0
            if not any(word in line for line in done.stdout.splitlines() for word in ("Queued", "Running")):
                return time.time() - t0
        time.sleep(poll_s)


def stage_env() -> dict[str, str]:
    """The environment of the DVC commands: ``PYTHONPATH`` starts with ``.``, so that the stage
    scripts of each experiment import ``pipeline`` from the experiment's own copy of the repository
    (DVC runs queued experiments in temporary copies; an editable install would otherwise point
    every experiment at the working tree it was installed from)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(["."] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_grid(args: argparse.Namespace) -> int:
    from pipeline.evaluate import ablations as ab

    names = list(ab.SMOKE_VARIANTS) if args.smoke and not args.variants else args.variants
    variants = ab.select_variants(names)
    if args.smoke:
        common = ab.grid_common(None, None, smoke=True)
    else:
        raw, test_list = (args.raw, None) if args.dry_run else _raw_folder(args.raw, args.recipe)
        common = ab.grid_common(str(raw), test_list or str(ab.recipe_data(args.recipe)["test_list"]))
    cmds = ab.grid_commands(variants, common, tag=args.tag)
    for cmd in cmds:
        print(ab.shell_line(cmd), flush=True)
    if args.dry_run:
        return 0
    dirty = _dirty()
    if dirty and not args.allow_dirty:
        raise ValueError("uncommitted changes to tracked files would go into every experiment; commit them, "
                         "run from a clean clone, or pass --allow-dirty:\n" + dirty)
    for cmd in cmds:
        subprocess.run(cmd, check=True, env=stage_env())
    if args.no_wait:
        print("queued; follow with `dvc queue status`, then `mda ablations report`")
        return 0
    log.info("ablations: queue done in %.0f s", wait_for_queue())
    command = "mda ablations run" + "".join(" " + a for a in sys.argv[sys.argv.index("run") + 1:]) \
        if "run" in sys.argv else "mda ablations run"
    code = run_report(argparse.Namespace(json=None, tag=args.tag, md=args.md, png=args.png, record_command=command))
    status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout
    ours = {ab.exp_name(v.name, args.tag) for v in variants}
    failed = [line for line in status.splitlines() if "Failed" in line and set(line.split()) & ours]
    if failed:
        print("failed experiments (`dvc queue logs NAME`):\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return code


def run_report(args: argparse.Namespace) -> int:
    from pipeline.evaluate import ablations as ab

    if args.json is not None:
        text = Path(args.json).read_text()
    else:
        # every commit's experiments: the grid's baseline need not be HEAD any more
        text = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True, text=True,
                              check=True).stdout
    records = ab.load_exp_show(text)
    names = [v.name for v in ab.VARIANTS]
    picked = ab.pick_records(records, names, args.tag)
    failed = sorted(r.name for r in records if r.failed and ab.variant_of(r.name, names))
    if failed:
        log.warning("ablations: failed experiments left out: %s", failed)
    if not picked:
        raise ValueError(f"no experiment named {ab.EXP_PREFIX}<variant>{'-' + args.tag if args.tag else ''} "
                         "in `dvc exp show` (run `mda ablations run` first)")
    rows = ab.table_rows(picked, names)
    for row in rows:
        name, margs = ab.model_args_of(picked[row.variant].params)
        row.params, row.gflops = ab.complexity(margs, name)
    baselines = sorted({r.baseline for r in picked.values()})
    smoke = any(ab.get_dotted(r.params, "register.raw_dir") == "data/demo" for r in picked.values())
    notes = ["SMOKE RUN on the synthetic demo data (a handful of steps): the numbers only prove the machinery."] if smoke else []
    md = ab.markdown_report(
        rows, ab.VARIANTS, command=args.record_command or "mda ablations run", commit=", ".join(baselines),
        machine=describe_machine(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), notes=notes,
        test_desc=_test_desc(list(picked.values()), smoke))
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    ab.write_chart(rows, args.png, title="SMOKE RUN (demo data)" if smoke else "")
    print(md)
    print(f"wrote {args.md} and {args.png}")
    return 0


def _test_desc(records: list, smoke: bool) -> str | None:
    """How the table describes its test set (None: the grid's own, TNO-25)."""
    from pipeline.evaluate import ablations as ab

    if smoke:
        return "the test split of the demo data"
    lists = {ab.get_dotted(r.params, "crop.test_list") for r in records}
    limits = {ab.get_dotted(r.params, "evaluate.max_pairs") for r in records}
    if lists != {ab.get_dotted(records[0].params, "crop.test_list")} or None in lists and len(lists) == 1:
        return "the test split" + ("s (they differ between experiments!)" if len(lists) > 1 else "")
    if limits != {None}:
        return f"the first {sorted(x for x in limits if x is not None)[0]} pairs of the test list {sorted(lists)[0]}"
    if not str(sorted(lists)[0]).endswith("subset_CDDFuse_test25.txt"):
        return f"the pairs of the test list {sorted(lists)[0]}"
    return None


def run_cost(args: argparse.Namespace) -> int:
    from pipeline.common.config import load_params
    from pipeline.evaluate import ablations as ab

    base = dict(load_params(Path("params.yaml")).get("model") or {})
    print(json.dumps({"input": list(ab.FLOP_INPUT)}))
    for v in ab.VARIANTS:
        args_ = dict(base.get("args") or {})
        args_.update({k.split(".", 2)[2]: x for k, x in v.overrides.items() if k.startswith("model.args.")})
        name, margs = ab.model_args_of({"model": {"name": base.get("name", "mda"), "args": args_}})
        n, g = ab.complexity(margs, name)
        print(f"{v.name:14s} params {n:>9,}  GFLOPs {g:6.2f}")
    return 0
