"""The NTMA's data path between tunnels and the LB: nftables DNAT, never SNAT.

    inner packet from the TUN, to (our vIP, P)   --dnat-->  (LB virtual address, P)
    ordinary client, to (public address, P)       --dnat-->  (LB virtual address, P)

The source is left alone, so the LB and the real servers see the mobile node's vIP (or the
ordinary client's address) as the client; their replies come back here by route (the LB's
return routes point at our service-side address) and conntrack undoes the DNAT, so a reply
leaves through the TUN with our vIP as its source, where the engine finds the MN's tunnel by
the destination. The forward chain lets through only what we DNATed and its replies: no one
uses the NTMA as a router into the service network or into tunnels.

Adopted flows: after a gateway failover, a flow DNATed by another NTMA arrives here
mid-stream, and its first packet may well come from the service side (a download: the
server sends, the MN only acknowledges what it gets, and it got nothing since the switch).
Such a packet, from (LB virtual address, P) toward a tunnel, has no conntrack entry here; it
gets its source rewritten to (our vIP, P) — exactly what undoing our own DNAT would have
done — and conntrack keeps that mapping for the rest of the flow both ways. NAT rules see
only a flow's first packet, so this never touches a flow that began here.

The tunnel engine has already checked every inner packet before it reaches the TUN (source
= the tunnel's peer vIP, destination = our vIP; counted as `rx_dropped_inner_address`).
"""

from __future__ import annotations

import logging
import subprocess

from .config import AdaptorConfig

log = logging.getLogger("ntm.adaptor.nft")


class NftError(RuntimeError):
    """nft refused the ruleset (the message carries its stderr)."""


def ruleset(cfg: AdaptorConfig, vip: str) -> str:
    """The whole table, replacing any earlier version of it in one transaction."""
    t = cfg.nft_table
    tun = cfg.node.tun_name
    lb = cfg.lb_address
    pre = [
        f'        iifname "{tun}" ip daddr {vip} {f.protocol} dport {f.port} '
        f'counter dnat to {lb}:{f.port} comment "tunnel {f}"'
        for f in cfg.forward
    ]
    for addr in cfg.public_addresses:
        pre += [
            f'        iifname != "{tun}" ip daddr {addr} {f.protocol} dport {f.port} '
            f'counter dnat to {lb}:{f.port} comment "public {f}"'
            for f in cfg.public_forward
        ]
    # Adopted flows (see the module docstring): what the service sends toward a tunnel
    # without conntrack state here.
    adopt = [
        f'        oifname "{tun}" ip saddr {lb} {f.protocol} sport {f.port} '
        f'counter snat to {vip}:{f.port} comment "adopted {f}"'
        for f in cfg.forward
    ]
    adopt_fwd = [
        f'        iifname "{cfg.service_interface}" oifname "{tun}" ip saddr {lb} '
        f"{f.protocol} sport {f.port} ct state new accept"
        for f in cfg.forward
    ]
    return "\n".join(
        [
            f"table ip {t}",
            f"delete table ip {t}",
            f"table ip {t} {{",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            *pre,
            "    }",
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
            *adopt,
            "    }",
            "    chain forward {",
            "        type filter hook forward priority filter; policy drop;",
            "        ct state established,related accept",
            f'        ct status dnat ip daddr {lb} counter accept comment "to the service"',
            *adopt_fwd,
            f'        iifname "{tun}" counter drop comment "from a tunnel, not to the service"',
            '        counter drop comment "not ours to forward"',
            "    }",
            "}",
            "",
        ]
    )


def nft(script: str) -> None:
    try:
        done = subprocess.run(
            ["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10
        )
    except FileNotFoundError:
        raise NftError("nft is not installed (apt install nftables)") from None
    except subprocess.TimeoutExpired:
        raise NftError(
            "nft did not finish within 10 s (machine overloaded?); retried at the next registration"
        ) from None
    if done.returncode != 0:
        raise NftError(done.stderr.strip() or f"nft exited {done.returncode}")


def install(cfg: AdaptorConfig, vip: str) -> None:
    nft(ruleset(cfg, vip))
    log.info(
        "forwarding %s of vIP %s%s to %s (the service sees the client's address; table ip %s)",
        ", ".join(map(str, cfg.forward)),
        vip,
        (
            f" and {', '.join(map(str, cfg.public_forward))} of {', '.join(cfg.public_addresses)}"
            if cfg.public_forward
            else ""
        ),
        cfg.lb_address,
        cfg.nft_table,
    )


def remove(cfg: AdaptorConfig) -> None:
    try:
        nft(f"table ip {cfg.nft_table}\ndelete table ip {cfg.nft_table}\n")
    except NftError as exc:
        log.warning("removing table ip %s: %s", cfg.nft_table, exc)


def enable_ip_forward() -> None:
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as fh:
        if fh.read().strip() == "1":
            return
    with open(path, "w") as fh:
        fh.write("1")
    log.info("sysctl net.ipv4.ip_forward = 1")


def counters(cfg: AdaptorConfig) -> dict[str, int]:
    """Packets per rule comment (`nft -j list table`), for the status; {} on any error."""
    import json

    try:
        done = subprocess.run(
            ["nft", "-j", "list", "table", "ip", cfg.nft_table],
            capture_output=True,
            text=True,
            timeout=5,
        )
        doc = json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
    out: dict[str, int] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict) or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                out[str(rule["comment"])] = int(expr["counter"].get("packets", 0))
    return out
