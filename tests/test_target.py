"""CPU target detection from /proc/cpuinfo flags and the weight format per target."""

import pytest

from graphquant import target
from graphquant.errors import GraphQuantError

AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
AVX512_NO_VNNI = "flags : fpu sse2 avx avx2 avx512f avx512bw avx512vl\n"
CASCADE_LAKE = "flags : fpu avx avx2 avx512f avx512bw avx512_vnni\n"
ALDER_LAKE = "flags : fpu avx avx2 avx_vnni\n"
SAPPHIRE_RAPIDS = "flags : avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"


def test_flags_are_read_from_the_first_flags_line():
    assert target.cpu_flags(AVX2_CPUINFO) == {"fpu", "vme", "sse", "sse2", "avx", "avx2", "fma",
                                              "bmi2"}
    assert target.cpu_flags("model name : x\n") == frozenset()


@pytest.mark.parametrize("text,name", [
    (AVX2_CPUINFO, "avx2"), (AVX512_NO_VNNI, "avx2"), (CASCADE_LAKE, "vnni"),
    (ALDER_LAKE, "vnni"), (SAPPHIRE_RAPIDS, "vnni"), ("", "avx2")])
def test_auto_detection(text, name):
    t = target.resolve("auto", cpuinfo_text=text)
    assert t.name == name
    assert "auto-detected" in t.description
    assert t.has_vnni == (name == "vnni")


def test_detection_names_what_it_saw():
    t = target.detect(target.cpu_flags(SAPPHIRE_RAPIDS))
    assert t.detected_flags == ("amx_int8", "avx512_vnni")
    assert "amx_int8" in t.description
    assert "avx512f" in target.detect(target.cpu_flags(AVX512_NO_VNNI)).description


def test_explicit_targets_ignore_the_machine():
    assert target.resolve("avx2", cpuinfo_text=CASCADE_LAKE).name == "avx2"
    assert target.resolve("vnni", cpuinfo_text=AVX2_CPUINFO).name == "vnni"


def test_unknown_target_is_a_user_error_with_a_fix():
    with pytest.raises(GraphQuantError) as err:
        target.resolve("avx3")
    assert "--target=auto" in str(err.value)


def test_weight_formats():
    assert target.weight_max_level("avx2") == 63
    assert target.weight_max_level("vnni") == 127
    assert target.weight_format("avx2", "conv", signed_input=False) == (63, 1)
    assert target.weight_format("avx2", "conv", signed_input=True) == (126, 2)
    assert target.weight_format("avx2", "depthwise", signed_input=True) == (127, 1)
    assert target.weight_format("avx2", "matmul", signed_input=True) == (63, 1)
    for kind in target.KINDS:
        assert target.weight_format("vnni", kind, True) == (127, 1)
    assert target.resolve("avx2").weight_format("conv") == (63, 1)
    with pytest.raises(ValueError):
        target.weight_format("avx2", "conv3d")
