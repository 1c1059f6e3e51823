"""The IPVS lane, for real: boot User-Mode Linux once and run tests/ipvs inside it.

The host kernel has no IPVS; UML's 6.1 kernel has (see lab/uml.py). Inside, the lane proves
the agent's IPVS backend on its own (test_ipvs_lane.py) and the whole issue-4 path, mn1 ->
tunnel -> ntma1 -> `ntm lb` on IPVS -> web1..3, on the lab runner (test_ntm_lab_ipvs.py).
The inner run must have passed and must have actually run its tests: a lane that skipped
or deselected anything, or lost one of the lab path's tests, fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

from lab.uml import SETUP_HINT, UML_KERNEL, run_in_uml, uml_unavailable_reason

# The whole boot + lane: a guard against a hung guest, not a performance figure (measured
# 2.7-3.5 min on the shared 2-core machine at load 6-7; docs/ipvs-in-uml.md).
LANE_TIMEOUT = 1200.0
LANE_MEM = "2G"  # eight daemons, three web servers, unbound and nsd inside
# -v: one line per test (checked below); --durations: where the lane's time goes
INNER = [sys.executable, "-m", "pytest", "-v", "--durations=5", "-p", "no:cacheprovider",
         "tests/ipvs"]  # fmt: skip
LAB_PATH_TESTS = "tests/ipvs/test_ntm_lab_ipvs.py"


@pytest.mark.lab
def test_ipvs_lane_passes_inside_uml() -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: booting UML with namespaces and IPVS needs root")
    if shutil.which(UML_KERNEL) is None:
        pytest.fail(f"{UML_KERNEL} is missing, so the IPVS lane cannot run: {SETUP_HINT}")
    reason = uml_unavailable_reason()
    if reason:
        pytest.fail(f"the IPVS lane cannot run: {reason}")

    result = run_in_uml(INNER, timeout=LANE_TIMEOUT, mem=LANE_MEM)
    shown = (
        f"--- inner pytest output ---\n{result.output}\n--- UML console (tail) ---\n"
        + (result.console[-3000:])
    )
    summary = _summary(result.output)
    assert result.returncode == 0, f"IPVS lane failed (exit {result.returncode})\n{shown}"
    assert summary.get("passed", 0) > 0, f"IPVS lane ran no tests\n{shown}"
    bad = {k: v for k, v in summary.items() if k != "passed" and v}
    assert not bad, f"IPVS lane did not run everything: {bad}\n{shown}"
    lab_path = _outcomes(result.output, LAB_PATH_TESTS)
    assert lab_path and set(lab_path.values()) == {"PASSED"}, (
        f"the NTMA -> IPVS path did not pass inside UML: {lab_path}\n{shown}"
    )
    print(f"IPVS lane in UML: {summary} in {result.seconds:.1f} s (boot included)")
    print("\n".join(_durations(result.output)))


def _durations(output: str) -> list[str]:
    """pytest's 'slowest durations' lines (where the lane's time went)."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if "slowest" in ln and "durations" in ln), None)
    if start is None:
        return []
    return [ln for ln in lines[start + 1 :] if re.match(r"^[\d.]+s ", ln)]


def _outcomes(output: str, path: str) -> dict[str, str]:
    """Test name -> outcome for one file, from pytest -v lines ('path::test PASSED [ 5%]')."""
    return dict(re.findall(rf"^{re.escape(path)}::(\S+) ([A-Z]+)", output, flags=re.MULTILINE))


def _summary(output: str) -> dict[str, int]:
    """Counts from pytest's last line, e.g. '12 passed, 1 skipped in 9.1s'."""
    lines = [ln for ln in output.strip().splitlines() if re.search(r"\bin [\d.]+s\b", ln)]
    if not lines:
        return {}
    return {
        word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)",
            lines[-1],
        )
    }
