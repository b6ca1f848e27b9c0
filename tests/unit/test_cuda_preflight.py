"""The driver/CUDA preflight (deepscaler/cuda_preflight.py) and the GPU processes that run it.

There is no NVIDIA driver here. The boundary simulated in every test: libcuda's
``cuDriverGetVersion``, reached through ``cuda_preflight.load_libcuda``, replaced by a real
ctypes function that writes the version a driver would report (12040 for CUDA 12.4); and
``torch.version.cuda``, set to the CUDA a cluster build of torch reports ("13.0" for PyPI's
torch 2.14.0).
"""

from __future__ import annotations

import ctypes
import os
from types import SimpleNamespace

import pytest
import torch

from deepscaler import cuda_preflight
from deepscaler.cuda_preflight import DriverTooOld

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_driver(monkeypatch, version: int | None, status: int = 0) -> None:
    """Simulated boundary: libcuda.so.1 whose cuDriverGetVersion reports ``version`` (None: no
    libcuda, a CPU machine)."""
    if version is None:
        def load():
            raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")
    else:
        @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))
        def get_version(out):
            out[0] = version
            return status

        def load():
            return SimpleNamespace(cuDriverGetVersion=get_version)
    monkeypatch.setattr(cuda_preflight, "load_libcuda", load)


def fake_torch(monkeypatch, cuda: str | None, version: str = "2.14.0") -> None:
    """Simulated boundary: the CUDA build of torch (``torch.version.cuda``, ``torch.__version__``)."""
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch, "__version__", version)


def test_a_driver_older_than_torchs_cuda_is_refused_in_one_line_with_the_fix(monkeypatch):
    """PyPI's torch 2.14.0 (CUDA 13.0) on an r550 driver (CUDA 12.4)."""
    fake_driver(monkeypatch, 12040)
    fake_torch(monkeypatch, "13.0")
    with pytest.raises(DriverTooOld) as err:
        cuda_preflight.require()
    line = str(err.value)
    assert "\n" not in line
    assert "CUDA 12.4" in line and "CUDA 13.0" in line and "r580" in line
    assert "pip install torch==2.14.0 --index-url https://download.pytorch.org/whl/cu126" in line


def test_a_driver_of_no_suitable_build_is_told_to_update(monkeypatch):
    fake_driver(monkeypatch, 11080)
    fake_torch(monkeypatch, "13.0")
    with pytest.raises(DriverTooOld, match=r"CUDA 11\.8 .*update the NVIDIA driver \(r580"):
        cuda_preflight.require()


@pytest.mark.parametrize("driver, built", [(13000, "13.0"), (13020, "13.0"), (12080, "12.8"), (13000, "12.6")])
def test_an_equal_or_newer_driver_is_accepted(monkeypatch, caplog, driver, built):
    fake_driver(monkeypatch, driver)
    fake_torch(monkeypatch, built, f"2.14.0+cu{built.replace('.', '')}")
    with caplog.at_level("INFO", logger="deepscaler.cuda_preflight"):
        result = cuda_preflight.require()
    assert result.ok and result.level == "info" and result.torch_cuda == built
    (line,) = [r.getMessage() for r in caplog.records if r.name == "deepscaler.cuda_preflight"]
    assert f"CUDA {driver // 1000}.{driver % 1000 // 10}" in line and f"CUDA {built}" in line


def test_an_older_minor_version_runs_with_a_warning(monkeypatch, caplog):
    """CUDA minor version compatibility: a CUDA 12.4 driver runs torch's CUDA 12.6 build."""
    fake_driver(monkeypatch, 12040)
    fake_torch(monkeypatch, "12.6", "2.14.0+cu126")
    with caplog.at_level("INFO", logger="deepscaler.cuda_preflight"):
        result = cuda_preflight.require()
    assert result.ok and result.level == "warning"
    assert [r.levelname for r in caplog.records if r.name == "deepscaler.cuda_preflight"] == ["WARNING"]


def test_a_cpu_machine_without_libcuda_is_not_refused(monkeypatch):
    fake_driver(monkeypatch, None)
    fake_torch(monkeypatch, "13.0")
    result = cuda_preflight.require()
    assert result.ok and result.driver_cuda is None and "no NVIDIA driver" in result.message


def test_this_machine_runs_the_real_check():
    """No simulation: the real ctypes load (no libcuda here) and this torch (a CPU build)."""
    result = cuda_preflight.require()
    assert result.ok
    if torch.version.cuda is None and not os.path.exists("/dev/nvidiactl"):
        assert "no NVIDIA driver" in result.message or "CPU build" in result.message


def test_a_driver_that_cannot_say_its_version_is_not_refused(monkeypatch):
    fake_driver(monkeypatch, 0, status=34)  # CUDA_ERROR_STUB_LIBRARY: the toolkit's stub libcuda
    fake_torch(monkeypatch, "13.0")
    result = cuda_preflight.require()
    assert result.ok and result.level == "warning" and "34" in result.message


def test_a_cpu_build_of_torch_beside_a_driver_is_a_warning(monkeypatch):
    fake_driver(monkeypatch, 13000)
    fake_torch(monkeypatch, None, "2.14.0+cpu")
    result = cuda_preflight.require()
    assert result.ok and result.level == "warning" and "CPU build" in result.message


# --------------------------------------------------------------------------- the GPU processes run it


def test_the_trainer_refuses_before_it_touches_cuda(monkeypatch):
    """The trainer's engine set-up runs the preflight first: an old driver is a one-line config
    error, not a silent CPU run (torch.cuda.is_available() would say False)."""
    from deepscaler.trainer import engine

    fake_driver(monkeypatch, 12040)
    fake_torch(monkeypatch, "13.0")
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: touched.append(1) or False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: touched.append(1) or 0)
    with pytest.raises(DriverTooOld, match="cu126"):
        engine.init_distributed()
    assert not touched


def test_the_inference_server_refuses_before_its_engine_starts(monkeypatch, caplog, tmp_path):
    """The server exits 2 with the one line, before a backend (an engine) is made."""
    from deepscaler.inference import server

    fake_driver(monkeypatch, 12040)
    fake_torch(monkeypatch, "13.0")

    def no_engine(*args):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(server, "make_backend", no_engine)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        with caplog.at_level("INFO"):
            code = server.main(["--config", f"{REPO}/yaml/stage1.yaml", f"{REPO}/yaml/tiny-random.yaml", "--name", "s",
                                "--weights-step", "base", "--no-auth", "--host", "127.0.0.1",
                                f"run.output_dir={tmp_path}"])
    finally:
        os.umask(umask)
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and "CUDA 12.4" in errors[0] and "cu126" in errors[0]
