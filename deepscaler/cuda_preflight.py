"""The NVIDIA driver against the CUDA that torch was built for, checked before anything touches a GPU.

torch 2.14.0 on PyPI is the CUDA 13.0 build: it needs a driver of the r580 branch or newer.
On an older driver torch does not say so plainly: ``torch.cuda.is_available()`` turns False
with a warning (a trainer would quietly go to the CPU), or the first CUDA call fails deep
inside torch. libcuda's ``cuDriverGetVersion`` answers without initialising CUDA or needing a
usable GPU, so every GPU process (the trainer's engine set-up, the inference server,
``deepscaler/gpu_check.py``) asks it first:

- a driver of an older CUDA major version than torch's build: refused, one line naming both
  versions and the fix (torch's build for the driver's CUDA, or a newer driver);
- an older minor version of the same major: runs (CUDA minor version compatibility), a warning;
- no driver (``libcuda.so.1`` absent: a CPU machine), or a CPU build of torch: nothing to check.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import asdict, dataclass

from deepscaler.config import ConfigError

log = logging.getLogger(__name__)

LIBCUDA = "libcuda.so.1"
# The oldest Linux driver branch for each CUDA major version (NVIDIA's CUDA compatibility table).
MIN_DRIVER = {11: "r450", 12: "r525", 13: "r580"}
# CUDA builds of recent torch releases on PyTorch's own index (download.pytorch.org/whl/cuXYZ).
TORCH_BUILDS = ((12, 6), (12, 8), (13, 0))


class DriverTooOld(ConfigError):
    """torch was built for a newer CUDA than the NVIDIA driver runs. One line (the entry points
    print it as a refused input and exit 2)."""


@dataclass(frozen=True)
class Preflight:
    ok: bool
    level: str  # "info", "warning" (runs, but worth a look) or "error" (refused)
    driver_cuda: str | None  # the newest CUDA the driver runs, "12.4"; None without a driver
    torch_cuda: str | None  # torch.version.cuda; None for a CPU build
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def load_libcuda():
    """The driver's library (raises OSError where there is none): the one boundary to the driver."""
    return ctypes.CDLL(LIBCUDA)


def driver_cuda_version() -> tuple[int, int] | str:
    """(major, minor) of the newest CUDA the installed driver runs, or why it is not known."""
    try:
        lib = load_libcuda()
    except OSError:
        return f"no NVIDIA driver ({LIBCUDA} not found)"
    version = ctypes.c_int(0)
    status = lib.cuDriverGetVersion(ctypes.byref(version))
    if status != 0:
        return f"the NVIDIA driver's CUDA version is unknown (cuDriverGetVersion returned {status})"
    return version.value // 1000, version.value % 1000 // 10


def _text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def torch_build_for(driver: tuple[int, int]) -> tuple[int, int] | None:
    """The torch CUDA build to install for this driver: the newest it runs, else the oldest of its
    major version (minor version compatibility); None when no build suits it."""
    fitting = [b for b in TORCH_BUILDS if b <= driver]
    same_major = [b for b in TORCH_BUILDS if b[0] == driver[0]]
    return max(fitting) if fitting else min(same_major) if same_major else None


def check(driver: tuple[int, int] | str, torch_cuda: str | None, torch_version: str) -> Preflight:
    """The verdict for a driver (from :func:`driver_cuda_version`) and a torch build."""
    if isinstance(driver, str):
        level = "info" if driver.startswith("no NVIDIA driver") else "warning"
        return Preflight(True, level, None, torch_cuda, f"{driver}; torch {torch_version}: no CUDA check")
    found = _text(driver)
    if not torch_cuda:
        return Preflight(True, "warning", found, None, f"the NVIDIA driver runs CUDA {found} but torch {torch_version} "
                                                       "is a CPU build: the GPUs go unused")
    built = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if driver >= built:
        return Preflight(True, "info", found, torch_cuda,
                         f"the NVIDIA driver runs CUDA {found}; torch {torch_version} is built for CUDA "
                         f"{torch_cuda}: ok")
    if driver[0] == built[0]:
        return Preflight(True, "warning", found, torch_cuda,
                         f"the NVIDIA driver runs CUDA {found}, older than torch {torch_version}'s CUDA "
                         f"{torch_cuda}: it runs under CUDA minor version compatibility (no PTX JIT); a newer "
                         "driver is safer")
    need = MIN_DRIVER.get(built[0])
    what = f"torch {torch_version} is built for CUDA {torch_cuda}" + (f" (driver {need} or newer)" if need else "")
    build = torch_build_for(driver)
    release = torch_version.split("+")[0]
    if build:
        fix = (f"install torch's CUDA {_text(build)} build (pip install torch=={release} --index-url "
               f"https://download.pytorch.org/whl/cu{build[0]}{build[1]}; docs/cluster.md) or update the driver")
    else:
        fix = f"update the NVIDIA driver ({need or 'a newer one'}; r525 or newer for torch's CUDA 12 builds)"
    return Preflight(False, "error", found, torch_cuda,
                     f"the NVIDIA driver runs CUDA {found} at most, but {what}: {fix}")


def preflight() -> Preflight:
    """This machine's verdict. Imports torch, but initialises nothing of CUDA."""
    import torch

    return check(driver_cuda_version(), torch.version.cuda, torch.__version__)


def require() -> Preflight:
    """Log this machine's verdict in one line; raise :class:`DriverTooOld` when refused."""
    result = preflight()
    if not result.ok:
        raise DriverTooOld(result.message)
    log.log(logging.WARNING if result.level == "warning" else logging.INFO, "cuda preflight: %s", result.message)
    return result
