"""The IPVS lane, for real: boot User-Mode Linux once and run tests/ipvs inside it.

The host kernel has no IPVS; UML's 6.1 kernel has (see lab/uml.py). The inner run must have
passed and must have actually run its tests: a lane that skipped everything fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

from lab.uml import SETUP_HINT, UML_KERNEL, run_in_uml, uml_unavailable_reason

LANE_TIMEOUT = 170.0  # the whole boot + lane; measured ~30-60 s on a 2-core machine
INNER = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "ipvs",
         "tests/ipvs"]  # fmt: skip


@pytest.mark.lab
def test_ipvs_lane_passes_inside_uml() -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: booting UML with namespaces and IPVS needs root")
    if shutil.which(UML_KERNEL) is None:
        pytest.fail(f"{UML_KERNEL} is missing, so the IPVS lane cannot run: {SETUP_HINT}")
    reason = uml_unavailable_reason()
    if reason:
        pytest.fail(f"the IPVS lane cannot run: {reason}")

    result = run_in_uml(INNER, timeout=LANE_TIMEOUT)
    shown = (
        f"--- inner pytest output ---\n{result.output}\n--- UML console (tail) ---\n"
        + (result.console[-3000:])
    )
    summary = _summary(result.output)
    assert result.returncode == 0, f"IPVS lane failed (exit {result.returncode})\n{shown}"
    assert summary.get("passed", 0) > 0, f"IPVS lane ran no tests\n{shown}"
    bad = {k: v for k, v in summary.items() if k != "passed" and v}
    assert not bad, f"IPVS lane did not run everything: {bad}\n{shown}"
    print(f"IPVS lane in UML: {summary} in {result.seconds:.1f} s (boot included)")


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
