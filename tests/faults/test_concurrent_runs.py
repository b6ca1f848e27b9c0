"""Two submits on one stage directory: the second is refused within seconds, naming the
holder, before it writes anything; the first finishes as if it had run alone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from deepscaler.run_lock import HOLDER, lock_dir
from deepscaler.store import RunStore
from tests.faults.test_damaged_files import assert_same_weights
from tests.integration.test_loop import REPO, STEPS, submit_argv, wait_until

pytestmark = pytest.mark.slow


def test_a_second_submit_on_a_live_stage_is_refused_and_the_first_run_is_unharmed(reference_stage: RunStore,
                                                                                  tmp_path: Path) -> None:
    store = RunStore(tmp_path, "tiny", 1)
    first = subprocess.Popen(submit_argv(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO)
    try:
        wait_until(lambda: (lock_dir(store) / HOLDER).is_file(), 120, "the first run's lock")
        metrics_before = store.metrics_path.read_bytes()
        t0 = time.monotonic()
        second = subprocess.run(submit_argv(tmp_path), capture_output=True, text=True, cwd=REPO, timeout=60)
        refused_in = time.monotonic() - t0
        out, err = first.communicate(timeout=400)
    finally:
        first.kill()
    assert second.returncode == 2 and refused_in < 20, (refused_in, second.stderr)
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert "in use by another run of this stage" in second.stderr and f"pid {first.pid} on " in second.stderr
    assert first.returncode == 0, err[-3000:]
    # Nothing of the second run reached the stage: one attempt in the metrics, one header per log.
    records = store.read_metrics().records
    assert [r["source"] for r in records if r.get("event") == "attempt"] == ["launcher"]
    assert store.metrics_path.read_bytes().startswith(metrics_before)
    assert (store.logs_dir / "trainer.log").read_text().count("=== ") == 1
    assert store.latest_stable("weights") == STEPS
    assert_same_weights(store, reference_stage, STEPS)  # bit-identical to the solo reference run
