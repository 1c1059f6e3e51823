"""`ntm lab demo`: the core scenario, narrated, on a lab it brings up and always tears down.

It drives the lab only through `ntm lab ...` commands, exactly as a user would type them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NTM = [sys.executable, "-m", "ntm_cli.main"]


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, name: str, compose: str, state: Path) -> None:
        self.name = name
        self.state = str(state)
        self.compose = compose
        self.failures: list[str] = []

    def lab(self, *args: str, check: bool = True, quiet: bool = False) -> str:
        cmd = [*NTM, "lab", args[0], "--name", self.name, "--state", self.state, *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if check and proc.returncode != 0:
            raise DemoFailed(f"`ntm lab {' '.join(args)}` failed:\n{proc.stderr.strip()}")
        if not quiet and proc.stdout.strip():
            for line in proc.stdout.strip().splitlines():
                print(f"    {line}")
        return proc.stdout

    def run_in(self, service: str, *cmd: str, check: bool = False) -> str:
        return self.lab("exec", service, "--", *cmd, check=check, quiet=True)

    def status(self, service: str) -> dict[str, Any]:
        out = self.run_in(service, "ntm", "status", "--socket", f"{self.state}/run/{service}.sock")
        return json.loads(out) if out.strip() else {}

    def say(self, text: str) -> None:
        print(f"\n== {text}")

    def check(self, ok: bool, what: str) -> None:
        print(f"   [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)

    def wait(self, cond: Callable[[], Any], what: str, bound: float = 20.0) -> Any:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if value := cond():
                return value
            time.sleep(0.2)
        self.check(False, f"{what} (not within {bound:.0f}s)")
        return None

    def curl(self, url: str) -> str:
        print(f"   $ ntm lab exec mn1 -- curl -s {url}")
        out = self.run_in("mn1", "curl", "-sS", "--max-time", "10", url).strip()
        print(f"     {out or '(no answer)'}")
        return out

    def scenario(self) -> None:
        self.say("Bringing the lab up: NSD, Unbound, dc1, cn2 (global), mn1 (behind nat-a)")
        self.lab("up", "--file", self.compose)
        mn1 = self.wait(lambda: (s := self.status("mn1")).get("registered") and s, "mn1 registered")
        cn2 = self.wait(lambda: (s := self.status("cn2")).get("registered") and s, "cn2 registered")
        if not mn1 or not cn2:
            return
        print(
            f"   mn1 registered with dc1: vIP {mn1['vip']}, DC sees it at {mn1['seen_by_dc']}"
            f" (behind NAT: {mn1['behind_nat']})"
        )
        print(f"   cn2 registered with dc1: vIP {cn2['vip']}")

        self.say("DNS: global.example.com is a CNAME to cn2.ntm.example.com (marked with 'ntm')")
        answer = self.run_in(
            "mn1", "ntm", "lab", "dnsprobe", "--server", "127.0.0.1", "global.example.com"
        )
        print(f"     the application on mn1 gets: {answer.strip()}")
        self.check(cn2["vip"] in answer, "mn1's stub resolver answered with cn2's vIP")

        self.say("HTTP to global.example.com from mn1 goes through the encrypted tunnel")
        page = self.curl("http://global.example.com/")
        self.check("server=cn2" in page, "cn2 answered")
        self.check(f"client={mn1['vip']}" in page, "cn2 sees mn1's virtual IP as the client")
        paths = self.status("mn1").get("paths", [])
        for p in paths:
            print(
                f"   path {p['path_id']} to {p['peer_fqdn']}: {p['kind']}, {p['state']},"
                f" peer at {p['peer_address']}"
            )

        self.say("What the internet sees: a capture on cn2's uplink during one more request")
        self.capture_check()

        self.say("plain.example.com has no NTMobile mark: resolved and reached untouched")
        before = self.status("dc1").get("counters", {}).get("directions", 0)
        page = self.curl("http://plain.example.com/")
        after = self.status("dc1").get("counters", {}).get("directions", 0)
        self.check(
            "server=plainweb" in page and "client=198.51.100.2" in page,
            "plainweb answered and saw nat-a's public address (no tunnel)",
        )
        self.check(after == before, "no Direction Request was sent for it")

        self.say("Handover: mn1 moves to access-b (IPv6-only) and keeps its vIP")
        self.lab("move", "mn1", "--to", "access-b")
        moved = self.wait(
            lambda: (
                (s := self.status("mn1")).get("registered")
                and str(s["seen_by_dc"][0]).startswith("2001:db8:b:")
                and s
            ),
            "mn1 re-registered from access-b",
        )
        if moved:
            self.check(moved["vip"] == mn1["vip"], f"same vIP {moved['vip']} after the move")
            page = self.wait(lambda: self.curl("http://global.example.com/"), "curl after move")
            self.check(f"client={mn1['vip']}" in (page or ""), "cn2 still sees the same vIP")
            for p in self.status("mn1").get("paths", []):
                print(
                    f"   path {p['path_id']} to {p['peer_fqdn']}: {p['kind']}, {p['state']},"
                    f" peer at {p['peer_address']}"
                )
        self.say("And back to access-a")
        self.lab("move", "mn1", "--to", "access-a")
        back = self.wait(
            lambda: (
                (s := self.status("mn1")).get("registered")
                and s["seen_by_dc"][0] == "198.51.100.2"
                and s
            ),
            "mn1 back on access-a",
        )
        if back:
            page = self.wait(lambda: self.curl("http://global.example.com/"), "curl after return")
            self.check(f"client={mn1['vip']}" in (page or ""), "same vIP again")

    def capture_check(self) -> None:
        pcap = f"{self.state}/demo-cn2.pcap"
        cap = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                f"{self.name}-cn2",
                "tcpdump",
                "-i",
                "internet",
                "-n",
                "-U",
                "--immediate-mode",
                "-w",
                pcap,
                "(tcp or udp) and not port 4433",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert cap.stderr is not None
            cap.stderr.readline()  # "listening on ..." once the capture runs
            self.curl("http://global.example.com/")
        finally:
            cap.terminate()
            cap.wait(timeout=10)
        raw = Path(pcap).read_bytes()
        lines = subprocess.run(
            ["tcpdump", "-n", "-r", pcap], capture_output=True, text=True
        ).stdout.splitlines()
        for line in lines[:4]:
            print(f"     {line}")
        if len(lines) > 4:
            print(f"     ... {len(lines) - 4} more")
        tunnel = [ln for ln in lines if ".7400 > " in ln and ": UDP" in ln]
        self.check(
            bool(lines) and len(tunnel) == len(lines),
            f"all {len(lines)} packets are tunnel UDP on port 7400",
        )
        self.check(
            b"server=cn2" not in raw and b"GET /" not in raw, "no plaintext HTTP on the wire"
        )


def run(name: str, compose: str, state: Path) -> int:
    demo = Demo(name, compose, state)
    try:
        demo.scenario()
    except DemoFailed as exc:
        demo.failures.append(str(exc))
        print(f"\n{exc}")
    finally:
        print("\n== Tearing the lab down")
        demo.lab("down", check=False)
    if demo.failures:
        print(f"\ndemo: {len(demo.failures)} check(s) failed:")
        for f in demo.failures:
            print(f"  - {f}")
        return 1
    print("\ndemo: all checks passed")
    return 0
