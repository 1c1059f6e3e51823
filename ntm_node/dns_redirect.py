"""Transparent DNS: catch applications' port-53 traffic with an nftables redirect.

Applications that ignore resolv.conf (or hard-code a public resolver) still reach the node's
stub resolver: outgoing UDP and TCP to port 53 on any address is redirected to the stub on
127.0.0.1. The stub's own upstream queries carry a firewall mark and pass untouched.
IPv4 only: a redirect in the output hook lands on 127.0.0.1; IPv6 DNS traffic passes.
"""

from __future__ import annotations

import subprocess

from ntm_io.config import ConfigError

MARK = 0x4E544D  # "NTM"


def table_name(node: str) -> str:
    return f"ntm_dns_{node}".replace("-", "_")


def ruleset(node: str, port: int) -> str:
    t = table_name(node)
    return f"""table ip {t} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        meta mark {MARK:#x} return comment "the stub's own upstream queries"
        ip daddr 127.0.0.0/8 return
        udp dport 53 redirect to :{port}
        tcp dport 53 redirect to :{port}
    }}
}}
"""


def install(node: str, port: int) -> None:
    remove(node)  # a leftover from a crashed run is replaced, not doubled
    _nft(ruleset(node, port), "install the DNS redirect")


def remove(node: str) -> None:
    subprocess.run(
        ["nft", "delete", "table", "ip", table_name(node)], capture_output=True, check=False
    )


def _nft(script: str, what: str) -> None:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(
            f"cannot {what}: nft is not installed (apt-get install nftables)"
        ) from None
    if proc.returncode != 0:
        raise ConfigError(
            f"cannot {what}: {proc.stderr.strip()}; it needs root and nftables, or set "
            "[dns] redirect = false"
        )
