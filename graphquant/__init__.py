"""graphquant: offline INT8 quantization of frozen TensorFlow graphs for x86 CPUs."""

from graphquant import runtime as _runtime

# Before anything below imports TensorFlow: oneDNN on, quiet logs (unless the user chose).
_runtime.configure_environment()

from graphquant.errors import GraphQuantError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GraphQuantError", "__version__"]
