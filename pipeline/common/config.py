"""Reading ``params.yaml`` and validating its values with errors that name the key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import yaml

_MISSING = object()
_T = TypeVar("_T")
#: ``setting(REQUIRED, ...)``: a key without default.
REQUIRED: Any = _MISSING


class ParamsError(ValueError):
    """A missing or invalid parameter; the message names the full key (``section.key``)."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load the whole parameter file.

    Args:
        path: YAML file, ``params.yaml`` in the repository root by default.

    Returns:
        The parsed mapping.

    Raises:
        FileNotFoundError: the file does not exist.
        ParamsError: the file is not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections at the top level")
    return data


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return the section ``name`` of the parameters, or raise ``ParamsError`` naming it."""
    value = params.get(name, _MISSING)
    if value is _MISSING:
        raise ParamsError(f"params: missing section '{name}'")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamsError(f"params: section '{name}' must be a mapping, got {type(value).__name__}")
    return dict(value)


def param(
    cfg: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *,
    where: str,
    default: Any = _MISSING,
    choices: Iterable[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
) -> Any:
    """Read and check one parameter.

    Args:
        cfg: the section mapping.
        key: key inside the section (dots descend into nested mappings, e.g. ``"optimizer.lr"``).
        kind: accepted type(s); ``int`` values are accepted where ``float`` is asked.
        where: section name used in error messages (``"crop"`` -> ``crop.patch_size``).
        default: value when the key is absent; without it the key is required.
        choices: allowed values.
        minimum, maximum: inclusive numeric bounds.
        allow_none: accept an explicit ``null``.

    Raises:
        ParamsError: naming ``where.key`` and what was expected.
    """
    full = f"{where}.{key}" if where else key
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise ParamsError(f"params: missing required key '{full}'")
            return default
        node = node[part]
    value = node
    if value is None:
        if allow_none or default is None:
            return None
        raise ParamsError(f"params: '{full}' must not be null")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise ParamsError(f"params: '{full}' must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise ParamsError(f"params: '{full}' must be {_names(kinds)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"params: '{full}' must be a finite number, got {value!r}")
    if choices is not None:
        allowed = list(choices)
        if value not in allowed:
            raise ParamsError(f"params: '{full}' must be one of {allowed}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParamsError(f"params: '{full}' must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ParamsError(f"params: '{full}' must be <= {maximum}, got {value!r}")
    return value


def setting(
    default: Any,
    kind: type | tuple[type, ...],
    *,
    convert: Callable[[Any, str], Any] | None = None,
    **checks: Any,
) -> Any:
    """A settings-dataclass field whose default and validation are written once.

    Args:
        default: the default (a list/dict/set default is copied per instance); :data:`REQUIRED`
            for a key that must be given (the field must then come before defaulted ones).
        kind: accepted type(s) in ``params.yaml`` (as :func:`param`).
        convert: ``convert(value, full_key)`` turns the checked value into the field's value
            (e.g. a list into a tuple, with its own checks); raise ``ParamsError`` naming the key.
        **checks: ``choices``, ``minimum``, ``maximum``, ``allow_none`` of :func:`param`.

    Example:
        >>> @dataclass(frozen=True)
        ... class CropConfig:
        ...     patch_size: int = setting(64, int, minimum=8)
    """
    spec = {"kind": kind, "convert": convert, "checks": checks}
    if default is _MISSING:
        return dataclasses.field(metadata={"param": spec})
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"param": spec})
    return dataclasses.field(default=default, metadata={"param": spec})


def read_settings(cls: type[_T], cfg: Mapping[str, Any], where: str, ignore: Iterable[str] = ()) -> _T:
    """Build the settings dataclass ``cls`` from its ``params.yaml`` section.

    Every field declared with :func:`setting` is read with :func:`param` (its default when the key
    is absent); fields without it keep their defaults. Keys of the section that are no field (and
    not in ``ignore``) are errors, so a typo is not silently replaced by a default.

    Raises:
        ParamsError: naming ``where.key``.
    """
    if cfg is not None and not isinstance(cfg, Mapping):
        raise ParamsError(f"params: section '{where}' must be a mapping, got {type(cfg).__name__}")
    cfg = cfg or {}
    known = {f.name for f in dataclasses.fields(cls)} | set(ignore)  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        raise ParamsError(f"params: unknown key(s) {[f'{where}.{k}' for k in unknown]} (known: {sorted(known)})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = f.metadata.get("param")
        if spec is None or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = _MISSING
        value = param(cfg, f.name, spec["kind"], where=where, default=default, **spec["checks"])
        if spec["convert"] is not None and value is not None:
            value = spec["convert"](value, f"{where}.{f.name}")
        values[f.name] = value
    return cls(**values)


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass as a plain dict (for ``--help`` texts and docs)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``{"a.b.c": value}`` (lists become their string form)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{full}."))
        elif isinstance(value, (list, tuple)):
            out[full] = str(list(value))
        else:
            out[full] = value
    return out


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)
