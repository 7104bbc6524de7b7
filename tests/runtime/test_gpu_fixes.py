"""Regression tests of two GPU-runtime fixes, both checkable without a GPU:

- the NVRTC wrapper must hand NVRTC writable buffers of its own: ``b" " * 1`` (the buffer of an empty compile
  log) is CPython's shared one-byte object, and NVRTC's NUL written into it turned ``b" "`` into ``b"\\x00"``
  for the whole process;
- ``query_device`` refuses a driver older than CUDA 13 with a clear NoDeviceError right after ``cuInit``
  (checked with a stand-in driver module: there is no real driver here).
"""

from __future__ import annotations

import enum
import subprocess
import sys
import textwrap

import pytest

from ddpm_deploy.runtime.device import cuda, kernels
from ddpm_deploy.runtime.device.kernels import KernelCompileError

# --- NVRTC: the compile must not write into CPython's cached one-byte bytes object ------------------------

# Run in a fresh interpreter, so that a regression cannot corrupt the pytest process (and no earlier test's
# compile can hide or cause the result). The checks read the cached object at run time: ``b" "[0]`` is
# constant-folded to 32 and ``b" " == bytes([32])`` compares the object with itself, so neither can see it.
_COMPILE_THEN_CHECK = textwrap.dedent("""
    import sys
    from ddpm_deploy.runtime.device import kernels
    archs = kernels.supported_archs()
    target = "sm_90" if 90 in archs else f"sm_{max(archs)}"
    out = kernels.compile_kernels(target)
    assert out.log == "", out.log  # an empty log: the size-1 buffer that used to be b" " * 1
    problems = []
    if bytes([32])[0] != 0x20:
        problems.append(f"bytes([32])[0] == {bytes([32])[0]:#x}")
    if b" ".join([b"a", b"b"]) != b"a b":  # b"a b" is a 3-byte constant of its own, not the cached object
        problems.append(f"b' '.join([b'a', b'b']) == {b' '.join([b'a', b'b'])!r}")
    if repr(bytes([32])) != "b' '":
        problems.append(f"repr(bytes([32])) == {repr(bytes([32]))}")
    print("; ".join(problems) or "intact")
    sys.exit(1 if problems else 0)
""")


def test_nvrtc_compile_leaves_the_cached_one_byte_bytes_intact():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (NVRTC) is not installed (" + kernels.INSTALL_GPU + ")")
    try:
        kernels.nvrtc_version()
    except KernelCompileError as e:
        pytest.skip(f"NVRTC cannot be loaded: {e}")

    proc = subprocess.run([sys.executable, "-c", _COMPILE_THEN_CHECK], capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0 and proc.stdout.strip() == "intact", (
        f"after an NVRTC compile the process-wide b' ' object is corrupted: {proc.stdout.strip()}\n{proc.stderr}")


# --- the driver must support CUDA 13: checked right after cuInit -------------------------------------------


class _StandInDriver:
    """A stand-in for ``cuda.bindings.driver`` (no real driver here): cuInit succeeds, cuDriverGetVersion reports
    ``version``, and there is no GPU (cuDeviceGetCount: 0)."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0

    def __init__(self, version: int):
        self.version = version
        self.calls: list[str] = []

    def cuInit(self, flags):
        self.calls.append("cuInit")
        return (self.CUresult.CUDA_SUCCESS,)

    def cuDriverGetVersion(self):
        self.calls.append("cuDriverGetVersion")
        return (self.CUresult.CUDA_SUCCESS, self.version)

    def cuDeviceGetCount(self):
        self.calls.append("cuDeviceGetCount")
        return (self.CUresult.CUDA_SUCCESS, 0)


@pytest.fixture()
def stand_in_driver():
    """Install a _StandInDriver of the given version through cuda.use_driver; the previous driver comes back."""
    previous = cuda.use_driver(None)
    try:
        def install(version: int) -> _StandInDriver:
            drv = _StandInDriver(version)
            cuda.use_driver(drv)
            return drv

        yield install
    finally:
        cuda.use_driver(previous)


def test_stand_in_driver_with_cuda_12_4_is_refused_with_a_clear_error(stand_in_driver):
    drv = stand_in_driver(12040)

    with pytest.raises(cuda.NoDeviceError) as info:
        cuda.query_device()

    msg = str(info.value)
    assert "CUDA 12.4" in msg and "12040" in msg  # the version found
    assert "CUDA 13.0" in msg and "580 or newer" in msg  # the version needed
    assert "upgrade the NVIDIA driver" in msg and "ddpm-run sample" in msg and "--device cpu" in msg  # what to do
    assert drv.calls == ["cuInit", "cuDriverGetVersion"]  # refused before any other call can fail confusingly
    assert cuda.MIN_DRIVER_VERSION == 13000


def test_stand_in_driver_with_cuda_13_passes_the_version_check(stand_in_driver):
    drv = stand_in_driver(13000)

    with pytest.raises(cuda.NoDeviceError, match="cuDeviceGetCount found no CUDA device"):
        cuda.query_device()  # past the version check: the stand-in has no GPU

    assert drv.calls == ["cuInit", "cuDriverGetVersion", "cuDeviceGetCount"]
    assert cuda.check_driver_version(13000) == 13000 and cuda.check_driver_version(13020) == 13020
