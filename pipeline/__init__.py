"""MDA infrared/visible image fusion pipeline.

Modules by concern (nothing runs at import time):

- ``pipeline.common.config``: reading and validating ``params.yaml``.
- ``pipeline.data.images``: the one image reader/writer, YCbCr conversion and pair discovery.
- ``pipeline.common.ray_runtime``: starting or joining Ray (local or ``RAY_ADDRESS``).
- ``pipeline.cli``: the ``mda`` console command.
"""

__version__ = "0.1.0"
