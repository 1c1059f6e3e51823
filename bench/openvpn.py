"""OpenVPN 2.6 as the reference tunnel: UDP, TLS (a throwaway CA), AES-256-GCM, no DCO.

Static-key mode cannot use GCM in 2.6, so this is the closest standard set-up: peer-to-peer
TLS (`--tls-server`/`--tls-client`) with NCP settling on `--data-ciphers AES-256-GCM`,
everything else at OpenVPN's defaults except the TUN MTU, set to our node's.

The interface is configured by us (`--ifconfig-noexec`), with link-scope addresses: our nodes
register every global address they have, so a global 10.99.x address would make them
re-register, rebuild their paths and offer it to peers as a tunnel endpoint mid-benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ntm_pki import ca


@dataclass(frozen=True)
class OvpnPair:
    """One OpenVPN link: server in the CN's namespace, client in the MN's."""

    dev: str
    port: int
    server_ip: str  # inside the tunnel
    client_ip: str
    server_outer: str  # where the client reaches the server

    @classmethod
    def numbered(cls, index: int, server_outer: str) -> OvpnPair:
        return cls(
            f"ovpnb{index}", 1194 + index, f"10.99.{index}.1", f"10.99.{index}.2", server_outer
        )


def make_pki(directory: Path) -> Path:
    """A CA, a server and a client certificate (ECDSA P-256), made with the project's PKI."""
    ca.init_ca(directory, "ntm bench OpenVPN CA", force=True)
    ca.issue(directory, "server", "relay", dns=["ovpn-server.bench.invalid"])
    ca.issue(directory, "client", "node", dns=["ovpn-client.bench.invalid"])
    return directory


def _common(pki: Path, pair: OvpnPair, mtu: int, log: Path) -> list[str]:
    return [
        "openvpn",
        "--dev",
        pair.dev,
        "--dev-type",
        "tun",
        "--proto",
        "udp",
        "--tun-mtu",
        str(mtu),
        "--data-ciphers",
        "AES-256-GCM",
        "--disable-dco",  # the kernel has no ovpn-dco; say so instead of probing
        "--dh",
        "none",  # ECDHE only
        "--ca",
        str(pki / "ca.pem"),
        "--ping",
        "10",
        "--ping-restart",
        "60",
        "--verb",
        "3",
        "--log",
        str(log),
    ]


def server_argv(pki: Path, pair: OvpnPair, mtu: int, log: Path) -> list[str]:
    return [
        *_common(pki, pair, mtu, log),
        "--local",
        pair.server_outer,
        "--lport",
        str(pair.port),
        "--ifconfig",
        pair.server_ip,
        pair.client_ip,
        "--ifconfig-noexec",
        "--tls-server",
        "--cert",
        str(pki / "server.pem"),
        "--key",
        str(pki / "server.key"),
    ]


def client_argv(pki: Path, pair: OvpnPair, mtu: int, log: Path) -> list[str]:
    return [
        *_common(pki, pair, mtu, log),
        "--remote",
        pair.server_outer,
        str(pair.port),
        "--nobind",
        "--ifconfig",
        pair.client_ip,
        pair.server_ip,
        "--ifconfig-noexec",
        "--tls-client",
        "--remote-cert-tls",
        "server",
        "--cert",
        str(pki / "client.pem"),
        "--key",
        str(pki / "client.key"),
    ]


def interface_argvs(pair: OvpnPair, mtu: int, server: bool) -> list[list[str]]:
    """`ip` commands (run inside the namespace) that do what `--ifconfig` would, link scope."""
    local, remote = (pair.server_ip, pair.client_ip) if server else (pair.client_ip, pair.server_ip)
    return [
        ["ip", "link", "set", "dev", pair.dev, "mtu", str(mtu), "up"],
        ["ip", "addr", "add", local, "peer", remote, "dev", pair.dev, "scope", "link"],
    ]


def data_channel_ready(log_text: str) -> bool:
    return "Initialization Sequence Completed" in log_text


def negotiated_cipher(log_text: str) -> str | None:
    """The data channel cipher OpenVPN reports, e.g. AES-256-GCM."""
    marker = "Data Channel: cipher '"
    at = log_text.rfind(marker)
    if at < 0:
        return None
    rest = log_text[at + len(marker) :]
    return rest.split("'", 1)[0]
