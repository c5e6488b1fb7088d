"""Kill a run with SIGKILL in the middle of a round, resume it, and get the uninterrupted run's result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run(output_dir: Path, *extra: str, wait: bool = True):
    command = [sys.executable, str(HERE / "resume_run.py"), str(output_dir), *extra]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    if wait:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_mid_round_then_resume_matches_uninterrupted(tmp_path):
    reference = run(tmp_path / "reference")

    interrupted = tmp_path / "interrupted"
    process = run(interrupted, wait=False)
    first_round = interrupted / "rmtkd-round-1" / "rmtkd_state.json"
    deadline = time.time() + 300
    while not first_round.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_round.exists(), "the run never finished its first round"
    time.sleep(1.0)  # into round 2: calibration or distillation
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "rmtkd-round-3").exists(), "the run finished before it was killed"
    # The killed process leaves no half-written round checkpoint behind.
    assert all((p / "rmtkd_state.json").exists() for p in interrupted.glob("rmtkd-round-*"))

    resumed = run(interrupted, "--resume")
    assert resumed["reductions"] == reference["reductions"]
    assert resumed["weights"] == pytest.approx(reference["weights"], rel=1e-4)
