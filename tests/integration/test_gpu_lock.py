"""``constraints/gpu.txt``, the cluster's locked environment, still resolves as locked.

The unit checks (no network): every line is an exact pin, setup.cfg's ranges admit the pins,
and the checker refuses a broken lock. The slow check asks pip's resolver against the package
index (``constraints/gpu_lock.py --check``): every pin installs together with no conflict, the
resolved set is exactly the lock, and torch is pinned to what vllm's metadata requires. Under
CI a missing network fails it; elsewhere it is skipped. About 40 s of CPU for both slow tests
(pip parses the index pages of 214 packages, 78 MB of JSON); no wheel is downloaded
(``fast-deps`` reads metadata with range requests; DeepSpeed's 2 MB sdist is the one archive).
"""

from __future__ import annotations

import importlib.util
import os
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.slurm_cluster import in_ci

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_lock", REPO / "constraints" / "gpu_lock.py")
gpu_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_lock)

LOCK_TEXT = gpu_lock.LOCK.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the lock's form, offline


def test_every_line_is_an_exact_pin_and_the_key_packages_are_there():
    pins = gpu_lock.parse_lock(LOCK_TEXT)
    assert len(pins) > 150, "the lock lost most of its packages"
    assert {"vllm", "torch", "transformers", "deepspeed", "triton", "math-verify", "submitit"} <= set(pins)
    assert pins["vllm"].startswith("0.33.") and pins["torch"] == "2.14.0" and pins["deepspeed"] == "0.19.8"
    assert "deepscaler" not in pins  # the project installs from the checkout (-e .)
    header = "\n".join(line for line in LOCK_TEXT.splitlines() if line.startswith("#"))
    assert "r580" in header and "docs/cluster.md" in header and "gpu_lock.py" in header


@pytest.mark.parametrize("bad", ["torch>=2.14", "torch==2.14.*", "torch", "-e .",
                                 "torch == 2.14.0 ; python_version>'3'", "--index-url https://example.org/simple"])
def test_a_line_that_is_not_an_exact_pin_is_refused(bad):
    with pytest.raises(gpu_lock.LockError, match=r"gpu.txt:3: .* is not an exact pin \(name==version\)"):
        gpu_lock.parse_lock(f"# header\nvllm==0.33.0\n{bad}\n")
    # its neighbours in form are accepted: comments, blank lines, local and post versions
    assert gpu_lock.parse_lock("# c\n\ntorch==2.14.0+cu126\nfoo_bar.baz==1.0.post1\n") == {
        "torch": "2.14.0+cu126", "foo-bar-baz": "1.0.post1"}


def test_a_package_pinned_twice_is_refused():
    with pytest.raises(gpu_lock.LockError, match="gpu.txt:2: Torch is pinned twice"):
        gpu_lock.parse_lock("torch==2.14.0\nTorch==2.13.0\n")


def test_setup_cfg_ranges_admit_the_pins():
    reqs = gpu_lock.setup_requirements()
    names = {r.name for r in reqs}
    assert {"vllm", "torch", "transformers", "deepspeed", "math-verify"} <= names
    assert gpu_lock.range_problems(gpu_lock.parse_lock(LOCK_TEXT), reqs) == []


def test_a_pin_outside_setup_cfg_or_missing_is_refused():
    pins = gpu_lock.parse_lock(LOCK_TEXT)
    reqs = gpu_lock.setup_requirements()
    outside = gpu_lock.range_problems({**pins, "vllm": "0.34.0"}, reqs)
    assert outside == ["vllm==0.34.0 is outside setup.cfg's vllm<0.34,>=0.33"]
    missing = gpu_lock.range_problems({k: v for k, v in pins.items() if k not in ("deepspeed", "submitit")}, reqs)
    assert missing == ["deepspeed is not pinned", "submitit (setup.cfg: submitit>=1.5) is not pinned"]
    assert gpu_lock.range_problems(pins, [*reqs, Requirement("torch>=2.14,<2.15")]) == []


def _report(pins: dict[str, str], vllm_torch: str = "torch==2.14.0") -> dict:
    """A pip report's shape (``--report``), for the checker's own tests."""
    items = [{"metadata": {"name": name, "version": version, "requires_dist": []}} for name, version in pins.items()]
    for item in items:
        if item["metadata"]["name"] == "vllm":
            item["metadata"]["requires_dist"] = [vllm_torch, "transformers<5.21.0,>=5.16.1",
                                                 'torch==9.9; sys_platform == "darwin"']
    return {"environment": {"sys_platform": "linux", "python_version": "3.11", "platform_machine": "x86_64"},
            "install": items}


def test_the_report_check_refuses_drift_and_a_torch_vllm_does_not_want():
    pins = gpu_lock.parse_lock(LOCK_TEXT)
    assert gpu_lock.report_problems(pins, _report(pins)) == []  # a marker for another platform is ignored
    wrong_torch = {**pins, "torch": "2.13.0"}
    assert gpu_lock.report_problems(wrong_torch, _report(pins)) == [
        "torch resolved to 2.14.0, pinned 2.13.0",
        "vllm==0.33.0 requires torch==2.14.0, the lock pins torch==2.13.0"]
    assert gpu_lock.report_problems(pins, _report(pins, vllm_torch="torch==2.15.0")) == [
        "vllm==0.33.0 requires torch==2.15.0, the lock pins torch==2.14.0"]
    unpinned = {k: v for k, v in pins.items() if k != "triton"}
    assert gpu_lock.report_problems(unpinned, _report(pins)) == [f"triton=={pins['triton']} is resolved but not pinned"]
    assert gpu_lock.report_problems({**pins, "flash-attn": "2.8.3"}, _report(pins)) == [
        "flash-attn==2.8.3 is pinned but not needed"]


# --------------------------------------------------------------------------- against the index


def _index_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=20) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def pip_wheel(tmp_path_factory):
    if not _index_reachable():
        (pytest.fail if in_ci() else pytest.skip)("the package index is not reachable: the GPU lock cannot be resolved")
    return gpu_lock.fetch_pip(tmp_path_factory.mktemp("pip"))


@pytest.mark.slow
def test_the_lock_resolves_exactly_as_locked(pip_wheel, tmp_path):
    """The CI check: pip resolves every pin of gpu.txt with no conflict to exactly gpu.txt, and
    torch's pin is what vllm's metadata requires."""
    assert gpu_lock.check(tmp_path, pip=pip_wheel) == []


@pytest.mark.slow
def test_a_lock_pip_cannot_resolve_fails_the_check(pip_wheel, tmp_path):
    """A conflict fails through pip's own resolver, with pip's explanation in the one line (two
    small packages: a conflict between vllm and torch takes pip about 40 s to explain)."""
    broken = tmp_path / "gpu.txt"
    broken.write_text("math-verify==0.9.0\nlatex2sympy2-extended==1.10.2\n", encoding="utf-8")
    with pytest.raises(gpu_lock.LockError, match=r"failed: ERROR: Cannot install .*conflicting dependencies.* \| "
                                                 r"math-verify 0\.9\.0 depends on latex2sympy2_extended==1\.11\.0"):
        gpu_lock.check(tmp_path, broken, pip_wheel)
    broken.write_text("math-verify==0.9.0\nlatex2sympy2-extended==1.11.0\n", encoding="utf-8")
    resolved = gpu_lock.resolved(gpu_lock.resolve(tmp_path, ["--requirement", str(broken)], pip_wheel))
    assert resolved["math-verify"] == "0.9.0" and "sympy" in resolved  # the same pair, consistent: resolves
