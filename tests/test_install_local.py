"""scripts/install-local.sh builds llama.cpp portably: never for the build machine's CPU. Your CPU is not your
users' CPU (a native build crashed on a user's Xeon with AMX), so these tests check the flags the script passes,
for x86-64 and for another architecture, and the runtime that is actually installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-local.sh"


def flags(arch: str, cmake_args: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    env["KEEL_BUILD_ARCH"] = arch
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-flags"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_build_is_never_native(arch: str) -> None:
    got = flags(arch)
    args = got["CMAKE_ARGS"].split()
    assert "-DGGML_NATIVE=OFF" in args
    assert not any("march=native" in a or a == "-DGGML_NATIVE=ON" for a in args), args
    assert "not for this CPU" in got["WHY"]


def test_x86_64_has_a_conservative_baseline_without_avx512_or_amx() -> None:
    args = flags("x86_64")["CMAKE_ARGS"].split()
    for on in ("AVX", "AVX2", "FMA", "F16C"):
        assert f"-DGGML_{on}=ON" in args
    for off in ("AVX512", "AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in args


def test_cmake_args_override_after_keels_flags_and_change_the_wheel_key() -> None:
    plain, custom = flags("x86_64"), flags("x86_64", "-DGGML_AVX512=ON")
    assert custom["CMAKE_ARGS"].split()[-1] == "-DGGML_AVX512=ON"  # cmake keeps the last -D: the user's wins
    assert "-DGGML_AVX512=ON" in custom["WHY"]
    assert custom["KEY"] != plain["KEY"]  # a wheel built with other flags is never picked up


def test_wheels_pip_built_itself_are_purged_from_its_cache(tmp_path: Path) -> None:
    cache = tmp_path / "pip-cache"
    stale = cache / "wheels" / "ab" / "cd" / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: pip lists it by name
    env = {**os.environ, "PIP_CACHE_DIR": str(cache), "KEEL_PIP": str(ROOT / ".venv" / "bin" / "pip")}
    out = subprocess.run(
        ["bash", str(SCRIPT), "--purge-pip-cache"], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "removing llama-cpp-python wheels that pip built" in out
    assert not stale.exists()


def test_the_installed_runtime_was_built_without_avx512_or_amx() -> None:
    if importlib.util.find_spec("llama_cpp") is None:  # not imported here: its import leaves /dev/null open
        pytest.skip("the embedded model needs the 'local' extra: keel-runtime[local]")
    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    info = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "AVX2 = 1" in info or "NEON = 1" in info, info
    assert "AVX512 = 1" not in info and "AMX" not in info, info
