"""The ``promote`` stage: register the trained model and move ``@champion`` only when it is better.

Rule (parameters from the ``promote`` section of ``params.yaml``):

1. The model logged by the training run (``model_uri`` of ``models/train.json``) becomes a new
   version of the registered model ``promote.model_name``, with its test means as version tags
   ``eval.<metric>``. A version already registered from the same run and model is reused, so a
   second run for the same model creates no second version and changes nothing.
2. Reference: the current ``@champion`` (its ``eval.<metric>`` tags) when it was evaluated on the
   same test set (tag ``test_set.digest``, from ``eval/test_set.json``); without a champion, or
   with a champion scored on another test set (whose means cannot be compared with ours), the
   pixel-average baseline of the same evaluation (``eval/means.json``), so a model is never
   promoted without beating a method without any learning on its own test set.
3. The version passes when it is strictly better than the reference on ``promote.primary`` (by
   more than ``promote.min_improvement``) and not worse on each gate metric by more than its
   tolerance (``promote.gates: {metric: tolerance}``). A reference without a value for a compared
   metric fails the comparison (never promote blindly).
4. Pass: alias ``champion`` moves to the version. Fail: alias ``challenger`` moves to it. Either way
   the tags ``promotion.decision`` (``champion``/``challenger``), ``promotion.reasons`` and
   ``promotion.compared_with`` record why.

Stages are not used (deprecated in MLflow 3): aliases only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline.common.atomic_io import read_json_object, write_text_atomic
from pipeline.common.config import ParamsError, param, read_settings, setting
from pipeline.common.mlflow_store import MlflowUnavailable, unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_DECISION = "promotion.decision"
TAG_REASONS = "promotion.reasons"
TAG_COMPARED = "promotion.compared_with"
TAG_SOURCE = "source_model_uri"
TAG_RUN = "train_run_id"
TAG_TEST_SET = "test_set.digest"
EVAL_TAG_PREFIX = "eval."
#: The method of ``eval/means.json`` that holds the trained model's means.
OURS = "ours"
#: Registered model names accepted (they go into MLflow search filters).
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: MLflow run ids (hex, or letters/digits/-/_ in other stores).
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _gates(gates: Mapping[str, Any], key: str) -> dict[str, float]:
    """``{metric: tolerance >= 0}``."""
    return {str(m): param(gates, str(m), float, where=key, minimum=0.0) for m in gates}


def _model_name(name: str, key: str) -> str:
    """A registered-model name safe to put into MLflow filters."""
    if not MODEL_NAME_RE.fullmatch(name):
        raise ParamsError(
            f"params: '{key}' must be 1-128 letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    return name


@dataclass(frozen=True)
class PromoteConfig:
    """The ``promote`` section of ``params.yaml``.

    Attributes:
        model_name: registered model name.
        primary: metric the new version must improve (higher is better).
        min_improvement: required margin on ``primary`` (``new > ref + min_improvement``).
        gates: ``{metric: tolerance}``: ``new >= ref - tolerance`` for each.
        baseline: method of ``eval/means.json`` that is the reference when there is no champion.
    """

    model_name: str = setting("mda-fusion", str, convert=_model_name)
    primary: str = setting("VIF", str)
    min_improvement: float = setting(0.0, float, minimum=0.0)
    gates: dict[str, float] = setting({"Qabf": 0.01, "SSIM": 0.02}, dict, convert=_gates)
    baseline: str = setting("average", str)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "PromoteConfig":
        """Validate the ``promote`` section (errors name ``promote.<key>``)."""
        return read_settings(cls, cfg, "promote")

    def compared_metrics(self) -> list[str]:
        """The primary metric followed by the gate metrics (no duplicates)."""
        return [self.primary, *(m for m in self.gates if m != self.primary)]


@dataclass
class Decision:
    """Outcome of ``promote`` (also written as JSON)."""

    model_name: str
    version: str
    decision: str
    reasons: list[str]
    compared_with: str
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    reference: dict[str, float]
    created: bool

    @property
    def promoted(self) -> bool:
        """True when the version is the champion."""
        return self.decision == CHAMPION

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (adds ``promoted``)."""
        return {**asdict(self), "promoted": self.promoted}


def compare(
    new: Mapping[str, float], reference: Mapping[str, float], cfg: PromoteConfig, ref_name: str = "champion"
) -> tuple[bool, list[str]]:
    """Apply the gate.

    Args:
        new: the candidate's metric means.
        reference: the champion's (or baseline's) means; a missing metric fails its check.
        cfg: primary metric, margin and gate tolerances.
        ref_name: how reasons name the reference.

    Returns:
        ``(passed, reasons)`` with one human-readable reason per compared metric.
    """
    reasons: list[str] = []
    passed = True
    for metric in cfg.compared_metrics():
        if new.get(metric) is None or not math.isfinite(new[metric]):
            passed = False
            reasons.append(f"{metric}: the candidate has no finite value, cannot compare")
            continue
        value = float(new[metric])
        if reference.get(metric) is None or not math.isfinite(reference[metric]):
            passed = False
            reasons.append(f"{metric}: {ref_name} has no recorded value, cannot compare")
            continue
        ref = float(reference[metric])
        if metric == cfg.primary:
            ok = value > ref + cfg.min_improvement
            need = f"> {ref_name} {ref:.4f}" + (f" + {cfg.min_improvement:g}" if cfg.min_improvement else "")
            kind = "primary"
        else:
            tol = cfg.gates[metric]
            ok = value >= ref - tol
            need = f">= {ref_name} {ref:.4f} - {tol:g}"
            kind = "gate"
        passed &= ok
        reasons.append(f"{metric} ({kind}): {value:.4f} {'meets' if ok else 'fails'} {need} ({value - ref:+.4f})")
    return passed, reasons


def read_eval_means(path: str | Path) -> dict[str, dict[str, float]]:
    """Read ``eval/means.json`` (``{method: {metric: mean}}``).

    Raises:
        FileNotFoundError: missing file. ValueError: not JSON or no ``ours`` entry.
    """
    means = read_json_object(path, "evaluation means", hint="run the evaluate stage")
    if not isinstance(means.get(OURS), dict):
        raise ValueError(f"{path}: expected {{method: {{metric: mean}}}} with a '{OURS}' entry")
    return means


def read_test_set_digest(path: str | Path) -> str:
    """Read the digest of the evaluated test set from ``eval/test_set.json`` (evaluate stage).

    Raises:
        FileNotFoundError: missing file. ValueError: not JSON or no ``digest``.
    """
    record = read_json_object(path, "test-set record", hint="run the evaluate stage")
    if not isinstance(record.get("digest"), str) or not record["digest"]:
        raise ValueError(f"{path}: expected an object with a 'digest' string")
    return record["digest"]


def _abort(action: str, exc: BaseException) -> MlflowUnavailable:
    """The one-line error of a registry call that failed: the promotion stops there."""
    err = unavailable(mlflow.get_registry_uri(), action, exc)
    return MlflowUnavailable(f"{err}; promotion aborted, aliases and versions untouched")


def _registry_call(action: str, call: Callable[[], T]) -> T:
    """Ask the registry; any failure aborts the promotion (``_abort``).

    Used for every read, so that "could not ask" is never mistaken for "not there".
    """
    try:
        return call()
    except (MlflowException, OSError) as exc:
        raise _abort(action, exc) from exc


def find_version(client: Any, name: str, run_id: str, model_uri: str) -> Any | None:
    """The version of ``name`` registered from ``model_uri`` of run ``run_id``, or ``None``.

    Raises:
        MlflowUnavailable: the registry could not be searched.
    """
    versions = _registry_call(
        f"search the versions of '{name}'",
        lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
    )
    for v in sorted(versions, key=lambda v: int(v.version)):
        if (v.tags or {}).get(TAG_SOURCE) == model_uri or v.source == model_uri:
            return v
    return None


def _registered_model(client: Any, name: str) -> Any | None:
    """The registered model ``name``, or ``None`` when the registry says it does not exist."""
    action = f"read the registered model '{name}'"
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise _abort(action, exc) from exc
    except OSError as exc:
        raise _abort(action, exc) from exc


def champion_version(client: Any, name: str) -> Any | None:
    """The version holding the ``champion`` alias, or ``None`` (no such model, or no alias).

    Only ``RESOURCE_DOES_NOT_EXIST`` for the model means "no champion"; a failed read raises.

    Raises:
        MlflowUnavailable: the registry could not be asked.
    """
    model = _registered_model(client, name)
    number = (getattr(model, "aliases", None) or {}).get(CHAMPION) if model is not None else None
    if number is None:
        return None
    return _registry_call(f"read version {number} of '{name}' (@{CHAMPION})",
                          lambda: client.get_model_version(name, str(number)))


def version_metrics(version: Any) -> dict[str, float]:
    """The ``eval.<metric>`` tags of a version as floats (unparsable values are ignored)."""
    out: dict[str, float] = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(EVAL_TAG_PREFIX):
            try:
                out[key[len(EVAL_TAG_PREFIX) :]] = float(value)
            except (TypeError, ValueError):
                continue
    return out


def _checked_inputs(train_info: Mapping[str, Any], eval_means: Mapping[str, Mapping[str, float]],
                    cfg: PromoteConfig) -> tuple[str, str]:
    """``(run_id, model_uri)`` of the training summary, after checking every input of ``promote``."""
    run_id, model_uri = str(train_info.get("run_id") or ""), str(train_info.get("model_uri") or "")
    if not run_id or not model_uri:
        raise ValueError("training summary lacks 'run_id' or 'model_uri'")
    if not RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"training summary: 'run_id' {run_id!r} is not an MLflow run id")
    if not MODEL_NAME_RE.fullmatch(cfg.model_name):
        raise ValueError(f"promote.model_name {cfg.model_name!r}: only letters, digits, '.', '_' and '-' are allowed")
    for metric in cfg.compared_metrics():
        if metric not in eval_means[OURS]:
            raise ValueError(f"metric '{metric}' (promote.primary/gates) is not in the evaluation means {sorted(eval_means[OURS])}")
    return run_id, model_uri


def _judge(ours: Mapping[str, float], eval_means: Mapping[str, Mapping[str, float]], cfg: PromoteConfig,
           champ: Any | None, vnum: str | None, test_set: str | None) -> tuple[bool, list[str], str, dict[str, float]]:
    """``(passed, reasons, reference name, reference means)`` against the champion or the baseline."""
    if champ is not None and vnum is not None and str(champ.version) == vnum:
        return True, ["already the champion"], f"version {vnum}", dict(ours)
    if champ is not None and (champ.tags or {}).get(TAG_TEST_SET) == test_set:
        ref_name, reference = f"champion v{champ.version}", version_metrics(champ)
        return (*compare(ours, reference, cfg, ref_name), ref_name, reference)
    if cfg.baseline not in eval_means:
        raise ValueError(f"no comparable champion and no '{cfg.baseline}' baseline in the evaluation means (promote.baseline)")
    ref_name, reference = f"baseline {cfg.baseline}", _finite(eval_means[cfg.baseline])
    passed, reasons = compare(ours, reference, cfg, ref_name)
    if champ is None:
        reasons.insert(0, "no champion yet: compared with the pixel baseline")
    else:
        theirs = (champ.tags or {}).get(TAG_TEST_SET) or "none recorded"
        reasons.insert(
            0,
            f"champion v{champ.version} was evaluated on another test set (digest {theirs[:12]} vs "
            f"{(test_set or 'none')[:12]}): not comparable, compared with the {cfg.baseline} baseline of this evaluation",
        )
    return passed, reasons, ref_name, reference


def _register(model_uri: str, name: str, run_id: str, ours: Mapping[str, float], test_set: str | None) -> str:
    """Register ``model_uri`` as a new version of ``name`` with its means as tags; returns the version."""
    tags = {f"{EVAL_TAG_PREFIX}{m}": f"{v:.6f}" for m, v in ours.items()}
    tags.update({TAG_SOURCE: model_uri, TAG_RUN: run_id})
    if test_set:
        tags[TAG_TEST_SET] = test_set
    try:
        return str(mlflow.register_model(model_uri, name, tags=tags).version)
    except MlflowException as exc:
        first = (exc.message.strip().splitlines() or [""])[0]
        raise ValueError(f"cannot register {model_uri} as '{name}': {first}") from exc


def _record(client: Any, name: str, vnum: str, decision: str, reasons: list[str], ref_name: str) -> None:
    """Move the alias ``decision`` to version ``vnum``, then tag the version with why."""
    def write() -> None:
        client.set_registered_model_alias(name, decision, vnum)
        for key, value in ((TAG_DECISION, decision), (TAG_REASONS, "; ".join(reasons)), (TAG_COMPARED, ref_name)):
            client.set_model_version_tag(name, vnum, key, value)

    _registry_call(f"record the decision for version {vnum} of '{name}'", write)


def promote(
    train_info: Mapping[str, Any],
    eval_means: Mapping[str, Mapping[str, float]],
    cfg: PromoteConfig,
    test_set: str | None = None,
) -> Decision:
    """Register the trained model and decide ``champion`` / ``challenger`` (see module docstring).

    Uses the MLflow store configured in this process (``pipeline.common.mlflow_store.configure_mlflow``).
    Every registry read happens before the first write, and a read that fails (anything but
    "does not exist") raises, so a registry that cannot be asked never moves an alias or adds a
    version.

    Args:
        train_info: ``models/train.json`` (``run_id``, ``model_uri``).
        eval_means: ``eval/means.json`` (``{"ours": {...}, "average": {...}, ...}``).
        cfg: the ``promote`` parameters.
        test_set: digest of the test set the means come from (``read_test_set_digest``); the
            champion is the reference only when its recorded digest is the same (both ``None``
            counts as the same, for stores without digests).

    Returns:
        The decision (``created`` is False when the version already existed and was decided).

    Raises:
        ValueError: bad inputs, or the model cannot be registered. MlflowUnavailable: the
            registry could not be asked (nothing was changed if it failed during the reads).
    """
    from mlflow.tracking import MlflowClient

    run_id, model_uri = _checked_inputs(train_info, eval_means, cfg)
    ours = _finite(eval_means[OURS])
    client, name = MlflowClient(), cfg.model_name
    existing = find_version(client, name, run_id, model_uri)
    if existing is not None and (existing.tags or {}).get(TAG_DECISION):
        tags = existing.tags
        log.info("%s version %s already registered from this model: %s", name, existing.version, tags[TAG_DECISION])
        return Decision(
            name, str(existing.version), tags[TAG_DECISION], tags.get(TAG_REASONS, "").split("; "),
            tags.get(TAG_COMPARED, ""), run_id, model_uri, version_metrics(existing), {}, created=False,
        )
    champ = champion_version(client, name)
    vnum = None if existing is None else str(existing.version)
    passed, reasons, ref_name, reference = _judge(ours, eval_means, cfg, champ, vnum, test_set)
    if vnum is None:
        vnum = _register(model_uri, name, run_id, ours, test_set)
    decision = CHAMPION if passed else CHALLENGER
    _record(client, name, vnum, decision, reasons, ref_name)
    log.info("%s version %s -> @%s (%s)", name, vnum, decision, "; ".join(reasons))
    return Decision(name, vnum, decision, reasons, ref_name, run_id, model_uri, ours, reference, created=existing is None)


def _finite(means: Mapping[str, Any]) -> dict[str, float]:
    """Drop ``null`` / non-finite means (a missing value fails its comparison)."""
    return {k: float(v) for k, v in means.items() if v is not None and math.isfinite(float(v))}


def write_decision(path: str | Path, decision: Decision) -> Path:
    """Write the decision as JSON (atomic)."""

    return write_text_atomic(Path(path), json.dumps(decision.to_json(), indent=2) + "\n")
