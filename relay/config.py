"""The Relay Server's configuration file (TOML), documented by example in relay/example.toml.

Tables: ``[relay]`` name, listen (addresses, one UDP socket each), port (7500), status_socket,
max_paths, idle_timeout, max_lifetime, capacity_pps, queue_packets, queue_bytes,
queue_max_age; ``[control]`` port (4434), listen (default: the relay's); ``[tls]`` ca,
cert, key (the certificate's role must be ``relay``; the DC checks it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ntm_io.config import ConfigError, load_toml, section

from .core import RelaySettings

DEFAULT_PORT = 7500
DEFAULT_CONTROL_PORT = 4434


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    ca: str
    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    name: str
    listen: tuple[str, ...]
    port: int
    control_listen: tuple[str, ...]
    control_port: int
    status_socket: str
    settings: RelaySettings
    tls: TlsConfig


def load(path: str | Path) -> RelayConfig:
    data = load_toml(path)
    relay = section(data, "relay")
    control = section(data, "control", required=False)
    tls = section(data, "tls")
    name = relay.text("name", what="a short name like rs1")
    listen = tuple(relay.ip_list("listen", ["0.0.0.0", "::"]))
    if not listen:
        raise ConfigError("[relay] listen is empty; list the addresses to serve on")
    if len(set(listen)) != len(listen):
        raise ConfigError("[relay] listen names an address twice; list each once")
    settings = RelaySettings(
        max_paths=relay.integer("max_paths", 10_000, 1, 10_000_000),
        idle_timeout=relay.number("idle_timeout", 90.0, lo=1.0),
        max_lifetime=relay.integer("max_lifetime", 86_400, 1, 2**32 - 1),
        queue_packets=relay.integer("queue_packets", 8, 0, 1024),
        queue_bytes=relay.integer("queue_bytes", 16_384, 0, 16 * 1024 * 1024),
        queue_max_age=relay.number("queue_max_age", 3.0, lo=0.1),
        capacity_pps=relay.number("capacity_pps", 50_000.0, lo=1.0),
    )
    cfg = RelayConfig(
        name=name,
        listen=listen,
        port=relay.integer("port", DEFAULT_PORT, 0, 65535),
        control_listen=tuple(control.ip_list("listen", list(listen))),
        control_port=control.integer("port", DEFAULT_CONTROL_PORT, 0, 65535),
        status_socket=relay.text("status_socket", f"/run/ntm/relay-{name}.sock"),
        settings=settings,
        tls=TlsConfig(ca=tls.text("ca"), cert=tls.text("cert"), key=tls.text("key")),
    )
    for table in (relay, control, tls):
        table.check_unknown()
    for what, file in (("ca", cfg.tls.ca), ("cert", cfg.tls.cert), ("key", cfg.tls.key)):
        if not Path(file).is_file():
            raise ConfigError(
                f"[tls] {what} = {file!r} does not exist; create it with `ntm pki` "
                "(the relay's certificate needs role relay)"
            )
    return cfg


__all__ = ["DEFAULT_CONTROL_PORT", "DEFAULT_PORT", "RelayConfig", "TlsConfig", "load"]
