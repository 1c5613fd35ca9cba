"""Import TensorFlow with the settings graphquant's graphs need, in one place.

Every module in graphquant gets TensorFlow through :func:`tf`.  The first call
sets, *before* TensorFlow is imported:

* ``TF_ENABLE_ONEDNN_OPTS=1`` -- oneDNN's graph rewrites; fp32 frozen graphs run
  1.1-3.3x faster with it on AMD/AVX2 CPUs where it is off by default, and the
  legacy ``Quantized...AndRequantize`` kernels are placeholders without it;
* ``TF_CPP_MIN_LOG_LEVEL=2`` -- hide TensorFlow's start-up chatter;

each only when the user has not set it.  If TensorFlow was imported earlier
without oneDNN, a single clear warning says what to set.
"""

import os
import sys
import warnings

_DEFAULTS = {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
_MIN_VERSION = (2, 21)
_tf = None
_configured = False


def onednn_enabled() -> bool:
    """Whether the oneDNN setting is on for this process (as TensorFlow read it)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") == "1"


def configure_environment() -> None:
    """Set graphquant's TensorFlow settings, or warn if it is too late for them.

    Called when ``graphquant`` is imported, so it runs before any submodule
    imports TensorFlow.  A setting the user made (even ``TF_ENABLE_ONEDNN_OPTS=0``)
    is respected silently; the warning is for TensorFlow imported earlier with
    no setting at all.
    """
    global _configured
    if _configured:
        return
    _configured = True
    if "tensorflow" not in sys.modules:
        for key, value in _DEFAULTS.items():
            os.environ.setdefault(key, value)
    elif "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        warnings.warn(
            "TensorFlow was imported before graphquant without TF_ENABLE_ONEDNN_OPTS=1: "
            "fp32 graphs run without oneDNN (slower baselines). Set "
            "TF_ENABLE_ONEDNN_OPTS=1 in the environment before anything imports tensorflow, "
            "or import graphquant first.",
            RuntimeWarning,
            stacklevel=3,
        )


def tf():
    """Return the ``tensorflow`` module, imported with graphquant's settings."""
    global _tf
    if _tf is not None:
        return _tf
    configure_environment()
    try:
        import tensorflow as module  # noqa: PLC0415 - deliberate late import
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from graphquant.errors import GraphQuantError

        raise GraphQuantError(
            f"TensorFlow is not installed ({exc}).",
            "pip install 'graphquant[tf]'  (or tensorflow-cpu==2.21.* if you use the CPU build)",
        ) from None
    version = tuple(int(p) for p in module.__version__.split(".")[:2] if p.isdigit())
    if version < _MIN_VERSION:  # pragma: no cover - depends on the environment
        from graphquant.errors import GraphQuantError

        raise GraphQuantError(
            f"TensorFlow {module.__version__} is too old: graphquant needs 2.21 or newer "
            "(the int8 kernels it emits are not all registered before).",
            "pip install 'tensorflow>=2.21,<2.22'",
        )
    _tf = module
    return _tf
