"""`precision=mixed` picks what is fast on the hardware at hand: each case with the GPU
and CPU-flag queries given, as on that hardware; and the run records the choice."""

from __future__ import annotations

import pytest

from pipeline.training import precision

NO_GPU: list[tuple[int, int]] = []


@pytest.mark.parametrize(("gpus", "flags", "expected"), [
    ([(8, 0)], set(), "mixed_bfloat16"),                      # A100: bfloat16 tensor cores
    ([(9, 0), (8, 6)], set(), "mixed_bfloat16"),
    ([(7, 5)], {"amx_bf16"}, "mixed_float16"),                 # T4: float16 with loss scaling
    ([(8, 0), (7, 0)], set(), "mixed_float16"),               # the slowest GPU decides
    (NO_GPU, {"avx2", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),  # Sapphire Rapids: AMX
    (NO_GPU, {"avx2", "avx512f", "avx512_bf16"}, "float32"),   # AVX512-BF16 without AMX: emulated matmuls
    (NO_GPU, {"avx2"}, "float32"),
    (NO_GPU, set(), "float32"),
])
def test_mixed_resolves_by_hardware(gpus, flags, expected) -> None:
    resolved = precision.resolve("mixed", gpus=gpus, flags=flags)
    assert resolved.policy == expected
    assert resolved.reason
    if expected == "float32":
        assert "precision=mixed_bf16" in resolved.reason, "says how to force bfloat16"


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_explicit_policies_are_kept(policy: str) -> None:
    assert precision.resolve(policy, gpus=NO_GPU, flags={"avx2"}).policy == policy
    assert precision.resolve(policy, gpus=[(8, 0)], flags=set()).policy == policy


def test_forced_bfloat16_on_a_cpu_without_amx_says_it_is_emulated() -> None:
    assert "emulated" in precision.resolve("mixed_bfloat16", gpus=NO_GPU, flags={"avx512_bf16"}).reason
    assert "emulated" not in precision.resolve("mixed_bfloat16", gpus=NO_GPU, flags={"amx_bf16"}).reason


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_a_run_records_the_policy_and_why(default_run) -> None:
    params = default_run.run.data.params
    assert params["precision.resolved_policy"] == "float32" and params["precision.reason"] == "configured"
