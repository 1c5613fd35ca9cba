"""The CPU a converted graph is made for, and the weight format exact on it.

oneDNN's int8 kernels are exact on CPUs with VNNI (``avx512_vnni``,
``avx_vnni``) or AMX (``amx_int8``): products accumulate straight into 32
bits.  Without VNNI (AVX2, AVX-512 without VNNI) they are not, unless the
weights are limited -- measured on TensorFlow 2.21 on an AVX2 CPU against an
exact integer reference (tests/test_int8_ops.py, tests/test_saturation_avx2.py):

================  ===========  ====================================  ==========
op                input        weights                               result
================  ===========  ====================================  ==========
conv              quint8       |w| <= 63                             bit-exact
conv              quint8       |w| <= 127                            rel. error ~0.09
conv              qint8        |w| <= 63 (odd values)                rel. error ~0.02
conv              qint8        even values, |w| <= 126               bit-exact
depthwise conv    either       |w| <= 127                            bit-exact
matmul            either       |w| <= 63                             bit-exact
matmul            either       |w| <= 127                            rel. error 0.1-0.5
================  ===========  ====================================  ==========

Causes: u8 x s8 pairs are summed in saturating 16 bits (vpmaddubsw), and for
s8 x s8 convolutions oneDNN halves the weights (round(w/2)) to make room for
its +128 input shift.  :func:`weight_format` turns this into a (max level,
multiple) pair for :func:`graphquant.quant_math.quantize_weights`.

``--target=auto|avx2|vnni``: ``auto`` reads this machine's ``/proc/cpuinfo``
flags.  The chosen target and its description are recorded in the output graph
and the report, because a graph made for ``vnni`` loses accuracy on an AVX2 CPU
(it still runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Iterable, Optional, Tuple

from graphquant.errors import GraphQuantError

TARGETS = ("auto", "avx2", "vnni")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "avxvnni"})
KINDS = ("conv", "depthwise", "matmul")


@dataclass(frozen=True)
class Target:
    """A resolved target: ``name`` is ``avx2`` or ``vnni``."""

    name: str
    description: str
    detected_flags: Tuple[str, ...] = ()

    @property
    def has_vnni(self) -> bool:
        return self.name == "vnni"

    def weight_format(self, kind: str, signed_input: bool = False) -> Tuple[int, int]:
        """(max level, multiple) for weights of ``kind`` (see :func:`weight_format`)."""
        return weight_format(self.name, kind, signed_input)


#: the avx2 weight formats, as the descriptions name them
SEVEN_BIT_WEIGHTS = "7-bit weights (|w| <= 63; even values for signed-input convs)"
PAIR_LIMITED_WEIGHTS = ("8-bit weights limited per adjacent input-channel pair (pair_weights; "
                        "--nopair_weights: 7-bit)")


def weight_format(target: str, kind: str, signed_input: bool = False) -> Tuple[int, int]:
    """(max level L, multiple M) of int8 weights that are exact on ``target``.

    ``kind`` is ``conv``, ``depthwise`` or ``matmul``; ``signed_input`` whether
    the op's activation input is qint8.  On ``vnni`` always (127, 1).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r}: one of {', '.join(KINDS)}")
    if target == "vnni":
        return 127, 1
    if target != "avx2":
        raise ValueError(f"unknown resolved target {target!r} (avx2 or vnni)")
    if kind == "depthwise":
        return 127, 1
    if kind == "conv" and signed_input:
        return 126, 2
    return 63, 1


def weight_max_level(target: str) -> int:
    """Max weight level of the common case (u8-input conv): 63 on avx2, 127 on vnni."""
    return weight_format(target, "conv", False)[0]


def cpu_flags(cpuinfo_text: Optional[str] = None) -> FrozenSet[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` text (read it
    when not given).  Empty when unreadable (not Linux)."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo_text = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect(flags: Iterable[str]) -> Target:
    """The target for a CPU with these flags."""
    flags = frozenset(flags)
    vnni = sorted(flags & VNNI_FLAGS)
    if vnni:
        return Target("vnni", "int8 dot products with VNNI/AMX (" + ", ".join(vnni)
                      + "): full 8-bit weights", tuple(vnni))
    simd = [f for f in ("avx512f", "avx2") if f in flags]
    what = simd[0] if simd else "no AVX2"
    return Target("avx2", f"{what} without VNNI: {SEVEN_BIT_WEIGHTS} so 16-bit "
                  "intermediate sums cannot saturate",
                  tuple(simd))


def resolve(target: str = "auto", cpuinfo_text: Optional[str] = None) -> Target:
    """``auto`` -> this CPU's target; ``avx2``/``vnni`` -> that target."""
    if target not in TARGETS:
        raise GraphQuantError(f"unknown target '{target}'",
                              "use --target=auto (this CPU), avx2 (no VNNI) or vnni")
    if target == "auto":
        found = detect(cpu_flags(cpuinfo_text))
        return Target(found.name, found.description + " [auto-detected]", found.detected_flags)
    if target == "vnni":
        return Target("vnni", "int8 dot products with VNNI/AMX: full 8-bit weights "
                      "[chosen; exact only on CPUs with VNNI or AMX]")
    return Target("avx2", f"AVX2 without VNNI: {SEVEN_BIT_WEIGHTS} [chosen; exact on every "
                  "x86-64 CPU with AVX2]")


def description_with_weights(target: Target, pair_weights: bool) -> str:
    """``target.description`` naming the weights actually written: on avx2 with
    pair_weights, 8-bit weights limited per input-channel pair instead of 7-bit ones."""
    if target.name == "avx2" and pair_weights:
        return target.description.replace(SEVEN_BIT_WEIGHTS, PAIR_LIMITED_WEIGHTS)
    return target.description
