"""The fusion model as an MLflow ``pyfunc``: load it by URI anywhere, or serve it over HTTP.

Input (one row per image pair), a ``pandas.DataFrame`` with two columns, or a dict of the same:

- ``ir``: the infrared image, (H, W) 8-bit values 0-255 (nested lists of ints in JSON, or a
  ``numpy`` uint8 array in Python);
- ``vi``: the visible image of the same H and W, (H, W) gray or (H, W, 3) colour in **BGR** order
  (OpenCV's, as ``pipeline.data.images.read_visible`` returns it), values 0-255.

Output: a ``pandas.DataFrame`` with one column ``fused`` (per row: (H, W) when ``vi`` is gray,
(H, W, 3) BGR when it is colour, nested lists of ints 0-255) for DataFrame input; for a dict of
numpy arrays, the fused ``numpy`` uint8 array itself (a list of arrays if the dict holds lists).

Serving: ``mlflow models serve -m <model_uri>`` then POST to ``/invocations``::

    {"dataframe_split": {"columns": ["ir", "vi"], "data": [[IR_HxW_list, VI_HxW_or_HxWx3_list]]}}

The answer is ``{"predictions": [{"fused": [[...]]}]}``.

The weights travel with the model as the artifact ``checkpoint`` (our checkpoint format) and are
loaded in ``load_context`` with ``pipeline.model.weights.load_model``; the ``pipeline`` package is
shipped as model code, so loading needs only the pip requirements recorded with the model. The model
is logged from code (``pipeline/model/pyfunc_code.py``, MLflow "models from code"), not as a
cloudpickled object: loading it runs our source, never unpickles a Python object.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

import pipeline
from pipeline.model.inference import Fuser

#: The models-from-code file logged as the model (it calls ``mlflow.models.set_model``).
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")


#: Largest image the served model fuses (pixels per image; ``MDA_SERVE_MAX_PIXELS`` overrides).
#: Fusing one pair takes about 0.6 KB of memory per pixel on CPU (a 4000x4000 pair reached 9 GiB),
#: so the default 4 MP keeps a worker near 2.5 GiB; larger requests get a 400 before any work.
MAX_PIXELS_ENV = "MDA_SERVE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 4_000_000


def max_pixels() -> int:
    """The pixel limit in force (``MDA_SERVE_MAX_PIXELS`` or the default)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    return int(value) if value and value.isdigit() and int(value) > 0 else DEFAULT_MAX_PIXELS


def _as_u8(value: Any, name: str, row: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim >= 2 and arr.shape[0] * arr.shape[1] > max_pixels():
        raise ValueError(f"row {row}: '{name}' has {arr.shape[0]}x{arr.shape[1]} pixels, over the limit of "
                         f"{max_pixels()} ({MAX_PIXELS_ENV})")
    if arr.dtype == object or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"row {row}: '{name}' must be an (H, W) or (H, W, 3) array of 0-255 values, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
            raise ValueError(f"row {row}: '{name}' must hold numbers 0-255")
        if not np.isfinite(arr).all():
            raise ValueError(f"row {row}: '{name}' holds NaN or infinite values")
        if float(arr.min()) < 0 or float(arr.max()) > 255:
            raise ValueError(f"row {row}: '{name}' values must be within 0-255, got {arr.min()}..{arr.max()}")
        arr = np.rint(arr).astype(np.uint8)
    return arr


#: MLflow's notice, at class creation, that ``predict`` has no type hints. None on purpose: with
#: hints MLflow converts the input to lists before the model sees it. MLflow sets its own warning
#: filter around the check, so the notice is dropped where it is shown (``warnings.showwarning``).
_TYPE_HINT_NOTICE = "Add type hints to the `predict` method"


@contextmanager
def _without_type_hint_notice() -> Iterator[None]:
    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if _TYPE_HINT_NOTICE not in str(message):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


with _without_type_hint_notice():

    class FusionPyfunc(mlflow.pyfunc.PythonModel):
        """``pyfunc`` wrapper around ``pipeline.model.inference.Fuser`` (see the module docstring for I/O)."""

        def load_context(self, context: Any) -> None:
            """Load the network from the ``checkpoint`` artifact."""

            self._fuser = Fuser.from_file(context.artifacts["checkpoint"])

        def fuse(self, ir: Any, vi: Any, row: int = 0) -> np.ndarray:
            """Fuse one pair: ir (H, W) and vi (H, W) or (H, W, 3) BGR, 0-255 -> uint8 like ``vi``."""
            return self._fuse_checked(*self._check(ir, vi, row))

        def _check(self, ir: Any, vi: Any, row: int) -> tuple[np.ndarray, np.ndarray]:
            ir_u8 = _as_u8(ir, "ir", row)
            vi_u8 = _as_u8(vi, "vi", row)
            if ir_u8.ndim != 2:
                raise ValueError(f"row {row}: 'ir' must be a single-channel (H, W) image, got shape {ir_u8.shape}")
            if ir_u8.shape != vi_u8.shape[:2]:
                raise ValueError(f"row {row}: 'ir' {ir_u8.shape} and 'vi' {vi_u8.shape[:2]} differ in size")
            return ir_u8, vi_u8

        def _fuse_checked(self, ir_u8: np.ndarray, vi_u8: np.ndarray) -> np.ndarray:
            return np.asarray(self._fuser(ir_u8, vi_u8), dtype=np.uint8)

        def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow infers schemas from hints
            """Fuse every row (DataFrame) or the arrays of a dict (see the module docstring).

            Bad input (shape, size mismatch, non-finite values, over ``MDA_SERVE_MAX_PIXELS``) is
            refused before any fusing, as an ``MlflowException`` (HTTP 400 from ``mlflow models
            serve``) whose message is the reason, with no traceback or server path.
            """
            try:
                return self._predict(model_input)
            except ValueError as exc:
                from mlflow.exceptions import MlflowException
                from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

        def _predict(self, model_input: Any) -> Any:

            if isinstance(model_input, pd.DataFrame):
                missing = {"ir", "vi"} - set(model_input.columns)
                if missing:
                    raise ValueError(f"input lacks column(s) {sorted(missing)}; expected 'ir' and 'vi'")
                pairs = [self._check(r.ir, r.vi, i) for i, r in enumerate(model_input.itertuples(index=False))]
                return pd.DataFrame({"fused": [self._fuse_checked(*p).tolist() for p in pairs]})
            if isinstance(model_input, dict):
                if "ir" not in model_input or "vi" not in model_input:
                    raise ValueError("input dict needs keys 'ir' and 'vi'")
                ir, vi = model_input["ir"], model_input["vi"]
                if isinstance(ir, (list, tuple)) and isinstance(vi, (list, tuple)) and ir and np.asarray(ir[0]).ndim == 2:
                    pairs = [self._check(a, b, i) for i, (a, b) in enumerate(zip(ir, vi))]
                    return [self._fuse_checked(*p) for p in pairs]
                return self.fuse(ir, vi)
            raise ValueError(f"unsupported input type {type(model_input).__name__}: pass a DataFrame or a dict")


def signature_and_example(size: tuple[int, int] = (16, 16)) -> tuple[Any, Any]:
    """The model signature (columns ``ir``, ``vi`` in, ``fused`` out) and a small input example."""

    sig = ModelSignature(
        inputs=Schema([ColSpec(Array(Array(DataType.long)), "ir"), ColSpec(AnyType(), "vi")]),
        outputs=Schema([ColSpec(AnyType(), "fused")]),
    )
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    ir = ((xx * 255) // max(w - 1, 1)).astype(np.uint8)
    vi = ((yy * 255) // max(h - 1, 1)).astype(np.uint8)
    example = pd.DataFrame({"ir": [ir.tolist()], "vi": [vi.tolist()]})
    return sig, example


def pip_requirements() -> list[str]:
    """Pinned requirements of the model environment (those of this process)."""

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for dist in ("mlflow", "numpy", "pandas", "opencv-python-headless", "pyyaml"):
        try:
            reqs.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_fusion_model(checkpoint: str | Path, name: str = "model") -> str:
    """Log ``checkpoint`` as a ``pyfunc`` model into the active MLflow run.

    Args:
        checkpoint: a weights file readable by ``pipeline.model.weights.load_model``.
        name: model name inside the run.

    Returns:
        The model URI (``models:/<model id>``), loadable with ``mlflow.pyfunc.load_model``.
    """

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    sig, example = signature_and_example()
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(pipeline.__file__).parent)],
        signature=sig,
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    return info.model_uri
