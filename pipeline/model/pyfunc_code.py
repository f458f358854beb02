"""Models-from-code entry of the fusion ``pyfunc`` (MLflow's recommended, pickle-free path).

``pipeline.model.pyfunc.log_fusion_model`` logs this file as the model's code; MLflow runs it when
the model is loaded, and ``set_model`` hands it the ``FusionPyfunc`` instance. Nothing is
cloudpickled: the model is this file, the ``pipeline`` package (shipped as ``code_paths``) and
the ``checkpoint`` artifact.
"""

from mlflow.models import set_model

from pipeline.model.pyfunc import FusionPyfunc

set_model(FusionPyfunc())
