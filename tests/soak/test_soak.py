"""The soak run (tests/soak/soak.py) for 3 minutes against the release binary: no 5xx, no transport
error, every greedy answer equal to its answer alone, resident memory flat after the first minute.
The 30-minute run and its numbers: docs/robustness.md."""
import json
import os
import subprocess
import sys

from conftest import ROOT, XGEN


def test_three_minutes_of_mixed_load(tmp_path):
    report, log = tmp_path / "report.json", tmp_path / "server.log"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "soak", "soak.py"), "--minutes", "3", "--binary", XGEN,
         "--report", str(report), "--log", str(log)],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr + log.read_text()[-3000:]
    r = json.loads(report.read_text())
    assert r["passed"] and r["status_5xx"] == 0 and not r["failures"], r
    kinds = r["by_kind_and_status"]
    # Every kind of load ran, and each answered as it should.
    assert kinds["chat"].get("200") and kinds["long"].get("200") and kinds["sampled"].get("200"), kinds
    assert kinds["disconnect"].get("closed") and kinds["bad"].get("400") and kinds["over"].get("400"), kinds
