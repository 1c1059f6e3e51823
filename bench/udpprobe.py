"""1 kHz UDP probe stream, run inside the MN's namespace: `python -m bench.udpprobe`.

Resolves the service name through the node's stub (the answer must be a vIP: the stream
goes through the tunnel), then sends one datagram every 1/rate seconds to the service's
UDP echo (`webN <datagram>` comes back) and timestamps each echo. Times are CLOCK_MONOTONIC
seconds, the same clock in every namespace, so the benchmark can line them up with the
events it causes. Output, one line each, flushed as it happens (`parse_line` reads them):

    V <address>                    the service address resolved
    S <t> <server>                 the echoing server changed (the first echo too)
    G <a> <b>                      no echo between a and b, b - a > --gap-ms
    T <a> <b>                      the sender itself was late from a to b (nothing sent:
                                   a busy machine, not the network)
    P <t> <last echo> <received>   a heartbeat every 0.1 s
    L <send time>                  at the end: a probe never echoed (after --grace)
    END <json>                     totals

Stop with SIGTERM or SIGINT. Send errors (e.g. no route for a moment) are counted; such a
probe is sent as far as the application knows, and is lost if no echo comes back.
"""

from __future__ import annotations

import argparse
import array
import errno
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import time
from collections import Counter
from types import FrameType

from .probe import VIP_NET, ProbeError, dns_a

PAYLOAD = struct.Struct("!QQ")  # seq, send time (monotonic ns)
HEARTBEAT = 0.1


class Probe:
    def __init__(self, sock: socket.socket, rate: float, gap: float, stall: float) -> None:
        self.sock = sock
        self.period = 1.0 / rate
        self.gap = gap
        self.stall = stall
        self.sent_t = array.array("d")
        self.got = bytearray()
        self.last_echo = 0.0
        self.server = b""
        self.received = 0
        self.duplicates = 0
        self.foreign = 0
        self.send_errors: Counter[str] = Counter()
        self.stop = False

    def out(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def send_one(self, now: float) -> None:
        seq = len(self.sent_t)
        self.sent_t.append(now)
        self.got.append(0)
        try:
            self.sock.send(PAYLOAD.pack(seq, time.monotonic_ns()))
        except OSError as exc:
            self.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    def receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: the echo is what counts
                continue
            now = time.monotonic()
            name, _, payload = data.partition(b" ")
            if len(payload) != PAYLOAD.size:
                self.foreign += 1
                continue
            seq, _sent_ns = PAYLOAD.unpack(payload)
            if seq >= len(self.got):
                self.foreign += 1
                continue
            if self.got[seq]:
                self.duplicates += 1
                continue
            self.got[seq] = 1
            self.received += 1
            if self.last_echo and now - self.last_echo > self.gap:
                self.out(f"G {self.last_echo:.6f} {now:.6f}")
            self.last_echo = now
            if name != self.server:
                self.server = name
                self.out(f"S {now:.6f} {name.decode(errors='replace')}")

    def run(self) -> None:
        next_send = time.monotonic()
        next_beat = next_send + HEARTBEAT
        while not self.stop:
            now = time.monotonic()
            if now - next_send > self.stall:
                # We were not scheduled in time: say so, and do not send a burst to catch up.
                self.out(f"T {next_send:.6f} {now:.6f}")
                next_send = now
            while next_send <= now:
                self.send_one(now)
                next_send += self.period
            if now >= next_beat:
                self.out(f"P {now:.6f} {self.last_echo:.6f} {self.received}")
                next_beat = now + HEARTBEAT
            wait = max(0.0, min(next_send, next_beat) - time.monotonic())
            try:
                ready, _, _ = select.select([self.sock], [], [], wait)
            except InterruptedError:
                continue
            if ready:
                self.receive()

    def finish(self, grace: float) -> None:
        end = time.monotonic() + grace
        while (left := end - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                self.receive()
        lost = 0
        for seq, got in enumerate(self.got):
            if not got:
                lost += 1
                self.out(f"L {self.sent_t[seq]:.6f}")
        totals = {
            "sent": len(self.sent_t),
            "received": self.received,
            "lost": lost,
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            "send_errors": dict(self.send_errors),
        }
        self.out("END " + json.dumps(totals))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udpprobe")
    parser.add_argument("--name", required=True, help="the service's marked name")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--rate", type=float, default=1000.0, help="datagrams per second")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="report silences over this")
    parser.add_argument("--stall-ms", type=float, default=20.0, help="sender lateness to report")
    parser.add_argument("--grace", type=float, default=1.0, help="s to wait for late echoes")
    parser.add_argument("--server", default="127.0.0.1", help="the node's stub resolver")
    args = parser.parse_args(argv)
    try:
        address = dns_a(args.name, args.server, 53, 8.0)
    except (OSError, ProbeError) as exc:
        print(f"udpprobe: {args.name}: {exc}", file=sys.stderr)
        return 2
    if ipaddress.ip_address(address) not in VIP_NET:
        print(f"udpprobe: {args.name} answered {address}, not a vIP (no tunnel)", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((address, args.port))
    sock.setblocking(False)
    probe = Probe(sock, args.rate, args.gap_ms / 1000, args.stall_ms / 1000)
    probe.out(f"V {address}")

    def stop(_signum: int, _frame: FrameType | None) -> None:
        probe.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    probe.run()
    probe.finish(args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
