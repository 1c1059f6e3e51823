"""lab/uml.py without booting anything: the init script it generates and its CLI parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import uml


def test_init_script_keeps_namespaces_and_resolv_confs_off_the_host(tmp_path: Path) -> None:
    script = uml._init_script(tmp_path, ["python", "-V"], Path("/repo"), ["ip_vs", "bridge"], {})
    lines = script.splitlines()
    # tmpfs over /run (netns handles) and /etc/netns (the lab runner's resolv.conf files),
    # both before anything can create namespaces
    run = lines.index("mount -t tmpfs -o mode=0755 tmpfs /run")
    etc = next(i for i, ln in enumerate(lines) if "tmpfs /etc/netns" in ln)
    modules = next(i for i, ln in enumerate(lines) if ln.startswith("for m in ip_vs bridge;"))
    command = next(i for i, ln in enumerate(lines) if ln.startswith("cd /repo && python -V"))
    assert run < etc < modules < command
    assert "TMPDIR=/run/tmp" in script  # temp files on the guest's tmpfs, not the host's /tmp


def test_default_modules_carry_the_lab_runner_and_xtables_nat() -> None:
    for module in ("ip_vs", "ip_vs_sh", "veth", "tun", "bridge", "iptable_nat", "xt_nat",
                   "xt_conntrack", "xt_comment"):  # fmt: skip
        assert module in uml.DEFAULT_MODULES


def test_cli_passes_timeout_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake(command: list[str], *, timeout: float, mem: str) -> uml.UmlResult:
        seen.update(command=command, timeout=timeout, mem=mem)
        return uml.UmlResult(0, "ok\n", "", 1.0)

    monkeypatch.setattr(uml, "run_in_uml", fake)
    assert uml.main(["--mem", "2G", "--timeout", "900", "--", "true"]) == 0
    assert seen == {"command": ["true"], "timeout": 900.0, "mem": "2G"}
    assert uml.main(["--timeout", "5"]) == 2  # no command
