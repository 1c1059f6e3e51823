"""Parsing iperf3's JSON (`iperf3 -J`) into the few figures the report needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


class IperfError(Exception):
    """iperf3 ran but reported an error, or its output is not what iperf3 3.x writes."""


@dataclass(frozen=True)
class IperfResult:
    protocol: str  # "tcp" or "udp"
    seconds: float  # the receiver's measured duration
    bytes_received: int
    mbps_received: float
    mbps_sent: float
    retransmits: int | None  # TCP only
    lost_percent: float | None  # UDP only
    jitter_ms: float | None  # UDP only
    sender_cpu_percent: float | None
    receiver_cpu_percent: float | None

    @property
    def gigabits_received(self) -> float:
        return self.bytes_received * 8 / 1e9

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("seconds", "mbps_received", "mbps_sent", "lost_percent", "jitter_ms"):
            if isinstance(out[key], float):
                out[key] = round(out[key], 3)
        for key in ("sender_cpu_percent", "receiver_cpu_percent"):
            if isinstance(out[key], float):
                out[key] = round(out[key], 1)
        return out


def _section(end: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = end.get(key)
    if not isinstance(value, Mapping):
        raise IperfError(f"iperf3 JSON has no end.{key}; is this iperf3 3.x output?")
    return value


def parse_iperf3(doc: Mapping[str, Any]) -> IperfResult:
    """The receiver's throughput (what arrived), the sender's offer, loss and CPU."""
    if doc.get("error"):
        raise IperfError(f"iperf3: {doc['error']}")
    start, end = doc.get("start"), doc.get("end")
    if not isinstance(start, Mapping) or not isinstance(end, Mapping):
        raise IperfError("iperf3 JSON lacks start/end; the test did not run")
    test = start.get("test_start", {})
    protocol = str(test.get("protocol", "TCP")).lower()
    sent = _section(end, "sum_sent")
    received = _section(end, "sum_received")
    cpu = end.get("cpu_utilization_percent") or {}
    # With -R the remote end sends; our client is always the sender here, so host = sender.
    reverse = bool(test.get("reverse", 0))
    host_cpu, remote_cpu = cpu.get("host_total"), cpu.get("remote_total")
    sender_cpu, receiver_cpu = (remote_cpu, host_cpu) if reverse else (host_cpu, remote_cpu)
    is_udp = protocol == "udp"
    return IperfResult(
        protocol=protocol,
        seconds=float(received.get("seconds", 0.0)),
        bytes_received=int(received.get("bytes", 0)),
        mbps_received=float(received.get("bits_per_second", 0.0)) / 1e6,
        mbps_sent=float(sent.get("bits_per_second", 0.0)) / 1e6,
        retransmits=None if is_udp else _opt_int(sent.get("retransmits")),
        lost_percent=_opt_float(received.get("lost_percent")) if is_udp else None,
        jitter_ms=_opt_float(received.get("jitter_ms")) if is_udp else None,
        sender_cpu_percent=_opt_float(sender_cpu),
        receiver_cpu_percent=_opt_float(receiver_cpu),
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
