"""Where a direct tunnel set-up spends its time: `sudo python -m bench.setup_trace`.

Brings up the benchmark's base lab, captures packets (tcpdump) in mn1's, dc1's and cn2's
namespaces, and times N cold set-ups of `global.example.com` from mn1. Before each, mn1's
node drops its paths to cn2 (`--fresh forget`, the default, as `ntm bench`'s setup section
does: a warm daemon) or is restarted (`--fresh restart`: every set-up is the daemon's first,
so first-use costs show). Every capture uses the host's clock, as
does the probe's wall-clock start, so one timeline spans the three namespaces. Each set-up
is cut into the steps below (a step named after a daemon is time spent inside it, from one
packet in to the next packet out); the p50 of each step over the runs is printed, and all
of it is written as JSON.

Diagnostic only: the captures cost CPU themselves, so compare steps with each other, not
with `ntm bench`'s figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntm_io.config import ConfigError

from .labctl import CN_ADDRESS, DC_ADDRESS, RESOLVER, BenchLab
from .nsproc import in_ns, run_in
from .setup_time import KINDS, LineProcess, probe_argv, runs_argv
from .stats import summary
from .tunnel import MARKED_NAME, probe_env

CAPTURED = ("mn1", "dc1", "cn2")
MN_PUBLIC = "198.51.100.2"  # nat-a's address: mn1 as dc1 and cn2 see it
BIG = 100  # bytes: a QUIC datagram carrying a message, not only acknowledgements

# The critical path of a set-up, one after the other: their sum is the whole set-up.
STEPS = (
    "mn1 stub: query in -> upstream query out",
    "resolver (cached) round trip",
    "mn1 stub: upstream answer -> Direction Request out",
    "wire mn1 -> dc1",
    "dc1: Direction Request in -> Route Direction to mn1 out",
    "wire dc1 -> mn1",
    "mn1: Route Direction in -> HANDSHAKE_INIT out",
    "wire mn1 -> cn2",
    "cn2: INIT in -> HANDSHAKE_RESP out",
    "wire cn2 -> mn1",
    "mn1: RESP in -> DNS answer at the app",
    "app: answer -> first HTTP byte through the tunnel",
)
# The push to the responder, from the same Direction Request: inside the dc1 step when the
# DC waits for the ack, beside it when it answers first (the last one is then negative).
PUSH_STEPS = (
    "dc1: Direction Request in -> push to cn2 out",
    "wire dc1 -> cn2",
    "cn2: push in -> ack out",
    "wire cn2 -> dc1",
    "dc1: ack in -> Route Direction to mn1 out",
)
ALL_STEPS = STEPS + PUSH_STEPS

_LINE = re.compile(r"^(\d+\.\d+) \S+\s+(In|Out)\s+IP6? (\S+) > (\S+?):? .*?(?:length (\d+))?\)?$")


@dataclass(frozen=True)
class Packet:
    t: float
    where: str  # the namespace it was captured in
    out: bool  # leaving that namespace (tcpdump "Out")
    src: str  # address.port
    dst: str
    length: int
    text: str


def parse_line(line: str, where: str) -> Packet | None:
    """One line of `tcpdump -r FILE -tt -n` for a capture on `any`; None if not IP."""
    m = _LINE.match(line.strip())
    if m is None:
        return None
    t, direction, src, dst, length = m.groups()
    return Packet(float(t), where, direction == "Out", src, dst, int(length or 0), line)


def steps(
    packets: Sequence[Packet], wall_start: float, dns_ms: float, first_byte_ms: float
) -> list[float]:
    """The durations (ms) of ALL_STEPS for the set-up that started at `wall_start`.

    Raises LookupError when a packet of the sequence is missing from the captures."""
    ordered = sorted(packets, key=lambda p: p.t)

    def find(after: float, where: str, out: bool, match: Callable[[Packet], bool]) -> float:
        for p in ordered:
            if p.t >= after and p.where == where and p.out == out and match(p):
                return p.t
        raise LookupError(f"no {'outgoing' if out else 'incoming'} packet in {where} after {after}")

    def to(prefix: str, big: bool = False) -> Callable[[Packet], bool]:
        return lambda p: p.dst.startswith(prefix) and (not big or p.length >= BIG)

    def frm(prefix: str, big: bool = False) -> Callable[[Packet], bool]:
        return lambda p: p.src.startswith(prefix) and (not big or p.length >= BIG)

    def chain(
        start: float, sequence: Sequence[tuple[str, bool, Callable[[Packet], bool]]]
    ) -> list[float]:
        marks = [start]
        for where, out, match in sequence:
            marks.append(find(marks[-1], where, out, match))
        return marks

    quic, tunnel = f"{DC_ADDRESS}.4433", f"{CN_ADDRESS}.7400"
    main = chain(
        wall_start,
        [
            ("mn1", True, lambda p: p.dst == f"{RESOLVER}.53" and f"A? {MARKED_NAME}." in p.text),
            ("mn1", False, frm(f"{RESOLVER}.53")),
            ("mn1", True, to(quic)),
            ("dc1", False, to(quic)),
            ("dc1", True, to(f"{MN_PUBLIC}.", big=True)),
            ("mn1", False, frm(quic, big=True)),
            ("mn1", True, to(tunnel, big=True)),
            ("cn2", False, to(tunnel, big=True)),
            ("cn2", True, frm(tunnel, big=True)),
            ("mn1", False, frm(tunnel, big=True)),
        ],
    )
    main += [wall_start + dns_ms / 1000, wall_start + first_byte_ms / 1000]
    dr_in, rd_out = main[4], main[5]
    push = chain(
        dr_in,
        [
            ("dc1", True, to(f"{CN_ADDRESS}.")),
            ("cn2", False, frm(quic)),
            ("cn2", True, to(quic)),
            ("dc1", False, frm(f"{CN_ADDRESS}.")),
        ],
    )
    push.append(rd_out)
    return [
        round((b - a) * 1000, 3) for a, b in (*itertools.pairwise(main), *itertools.pairwise(push))
    ]


def summarize(runs: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    return [{"step": name, **summary([r[i] for r in runs])} for i, name in enumerate(ALL_STEPS)]


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'step':56} {'p50 ms':>8} {'mean':>8}"]
    main = [r for r in rows if r["step"] in STEPS]
    for row in rows:
        if row["step"] == PUSH_STEPS[0]:
            lines.append(f"{'sum of p50s':56} {sum(r.get('p50', 0) for r in main):8.2f}")
            lines.append("the push to the responder (within or beside the dc1 step):")
        lines.append(f"{row['step']:56} {row.get('p50', 0):8.2f} {row.get('mean', 0):8.2f}")
    return "\n".join(lines)


def capture(lab: BenchLab, runs: int, out: Path, fresh: str) -> list[dict[str, Any]]:
    """Run the captures and the probes; the probes' results, one per set-up."""
    caps = []
    for svc in CAPTURED:
        argv = ["tcpdump", "-i", "any", "-n", "-U", "-s", "160", "-w", str(out / f"{svc}.pcap")]
        argv += ["--time-stamp-precision=micro", "udp or tcp port 80"]
        with (out / f"{svc}.tcpdump.log").open("wb") as log:
            caps.append(subprocess.Popen(in_ns(lab.ns(svc), argv), stderr=log))
    try:
        time.sleep(1.0)  # tcpdump has opened its socket
        if fresh == "forget":
            return _forget_runs(lab, runs)
        return _restart_runs(lab, runs)
    finally:
        _written_out([out / f"{svc}.pcap" for svc in CAPTURED])
        for proc in caps:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)


def _written_out(files: Sequence[Path], bound: float = 15.0) -> None:
    """Wait until tcpdump has written what it captured: the kernel hands packets over in
    blocks, a partly filled one after libpcap's 1 s timeout, and what is still in the
    kernel at SIGINT is lost. Done when the files stopped growing for 1.5 s, or `bound`."""
    deadline = time.monotonic() + bound
    sizes: list[int] = []
    while time.monotonic() < deadline:
        now = [f.stat().st_size if f.exists() else 0 for f in files]
        if now == sizes:
            return
        sizes = now
        time.sleep(1.5)


def _restart_runs(lab: BenchLab, runs: int) -> list[dict[str, Any]]:
    results = []
    for i in range(runs):
        lab.kill("mn1")
        lab.start("mn1")
        lab.wait_registered("mn1")
        time.sleep(0.3)  # registration traffic is over before the timed query
        done = run_in(lab.ns("mn1"), probe_argv([MARKED_NAME]), 60, probe_env())
        one = (json.loads(done.stdout or "{}").get("names") or {}).get(MARKED_NAME) or {}
        results.append(one)
        print(f"run {i}: {one.get('cold') or one.get('error')}", file=sys.stderr)
    return results


def _forget_runs(lab: BenchLab, runs: int) -> list[dict[str, Any]]:
    """One probe process; mn1's node forgets its paths to cn2 before each run."""
    direct = [k for k in KINDS if k.key == "direct"]
    child = LineProcess(in_ns(lab.ns("mn1"), runs_argv(lab, "mn1", direct, runs)), 20.0 * runs + 60)
    results = []
    try:
        for line in child.lines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            one = (doc.get("names") or {}).get(MARKED_NAME) or {"error": doc.get("error")}
            results.append(one)
            print(f"run {doc.get('run')}: {one.get('cold') or one.get('error')}", file=sys.stderr)
    finally:
        child.finish()
    return results


def read_packets(out: Path) -> list[Packet]:
    packets = []
    for svc in CAPTURED:
        argv = ["tcpdump", "-r", str(out / f"{svc}.pcap"), "-tt", "-n"]
        text = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        packets += [p for line in text.splitlines() if (p := parse_line(line, svc))]
    return packets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_trace")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument(
        "--fresh",
        choices=("forget", "restart"),
        default="forget",
        help="before each run mn1 forgets its paths (default, warm daemon) or restarts",
    )
    args = parser.parse_args(argv)
    if shutil.which("tcpdump") is None:
        raise ConfigError("tcpdump is missing: apt-get install tcpdump")
    work = Path(tempfile.mkdtemp(prefix="ntmtrace-"))
    lab = BenchLab(work, with_direct=False)
    try:
        lab.up()
        for svc in ("cn2", "mn1"):
            lab.wait_registered(svc)
        results = capture(lab, args.runs, work, args.fresh)
    finally:
        lab.down()
    packets = read_packets(work)
    timed, skipped = [], []
    for one in results:
        cold = one.get("cold")
        if not cold:
            skipped.append(str(one.get("error")))
            continue
        try:
            timed.append(steps(packets, cold["wall_start"], cold["dns_ms"], cold["first_byte_ms"]))
        except LookupError as exc:
            skipped.append(str(exc))
    rows = summarize(timed) if timed else []
    print(render(rows))
    doc = {
        "runs": len(results),
        "fresh": args.fresh,
        "traced": len(timed),
        "skipped": skipped,
        "steps": rows,
    }
    doc["cold"] = {
        k: summary([float(r["cold"][k]) for r in results if r.get("cold")])
        for k in ("dns_ms", "first_byte_ms")
    }
    doc["plain_lookup_ms"] = summary(
        [float(r["plain_lookup"]["dns_ms"]) for r in results if r.get("plain_lookup")]
    )
    out = args.out or work / "trace.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"JSON: {out}; captures in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
