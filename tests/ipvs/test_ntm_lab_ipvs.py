"""Issue 4 through real IPVS: mn1 -> NTMobile tunnel -> ntma1 -> lb (IPVS backend) -> web1..3.

Runs inside User-Mode Linux (tests/integration/test_uml_ipvs.py) on the lab built by
ntm_lab.py: the same checks as tests/integration/test_adaptor.py, where the LB runs nftables,
here with `ntm lb` driving the kernel's IPVS. Every wait polls a condition with a bound.
"""

from __future__ import annotations

import collections
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lb_integration.config import LbConfig, parse
from lb_integration.ipvs_backend import IpvsBackend, normalise_state
from lb_integration.model import Protocol

from .conftest import IPVS_PROC
from .ntm_lab import UP_TIMEOUT, NtmLab, compose_text

pytestmark = pytest.mark.ipvs

URL = "http://www.example.com/whoami"
STICKY_URL = "http://www.example.com:8080/whoami"
NTMA_DMZ = "10.30.0.2"
WEBS = {"10.40.0.11": "web1", "10.40.0.12": "web2", "10.40.0.13": "web3"}
READY_BOUND = 180.0  # UML is slow, and shares two cores with everything else
CURL = ("curl", "-sS", "--max-time", "30")

# One datagram per new socket (a new source port each time) to the service; prints replies.
UDP_ASK = (
    "import socket,sys\n"
    "for i in range(int(sys.argv[2])):\n"
    "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "    s.settimeout(10)\n"
    "    s.sendto(b'hello',(sys.argv[1],9000))\n"
    "    print(s.recvfrom(200)[0].decode())\n"
    "    s.close()\n"
)


def wait_for(what: str, condition: Callable[[], Any], bound: float = READY_BOUND) -> Any:
    deadline = time.monotonic() + bound
    while True:
        try:
            value = condition()
        except (OSError, AssertionError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:.0f} s: {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NtmLab]:
    if not IPVS_PROC.exists():
        pytest.skip("no IPVS here")
    if shutil.which("iptables-legacy-restore") is None:
        pytest.fail(
            "iptables-legacy-restore is missing (ntma1's DNAT in UML): apt-get install iptables"
        )
    from tests.integration.conftest import Lab, unique_name

    where = tmp_path_factory.mktemp("ntmlab")
    text, lb_cfg = compose_text(where)
    compose = where / "compose.yaml"
    compose.write_text(text)
    running = Lab(unique_name(), where / "state", compose)
    started = time.monotonic()
    lab = NtmLab(running, lb_cfg)
    try:
        try:
            running.ntm_lab("up", "--file", str(compose), timeout=UP_TIMEOUT)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{lab.log_tails()}") from None
        print(f"\nntm lab up inside UML: {time.monotonic() - started:.0f} s")
        yield lab
    finally:
        running.down()


def all_in_service(lab: NtmLab) -> bool:
    return all(r["in_service"] for s in lab.status("lb")["services"] for r in s["reals"])


@pytest.fixture(scope="module")
def vips(lab: NtmLab) -> dict[str, str]:
    """Everything up, and mn1's tunnel to www.ntm.example.com established."""
    try:
        wait_for("mn1 registered", lambda: lab.status("mn1")["registered"])
        wait_for("ntma1 forwarding", lambda: lab.status("ntma1")["adaptor"]["forwarding_vip"])
        wait_for("all real servers in service", lambda: all_in_service(lab))

        def tunnel_up() -> bool:
            lab.run("mn1", "getent", "hosts", "www.example.com")  # the CNAME starts it
            return any(
                p["peer_fqdn"] == "www.ntm.example.com" and p["state"] == "established"
                for p in lab.status("mn1")["paths"]
            )

        wait_for("mn1's tunnel to www.ntm.example.com", tunnel_up)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{lab.log_tails()}") from None
    return {"mn1": lab.status("mn1")["vip"], "ntma1": lab.status("ntma1")["vip"]}


def agent_config(lab: NtmLab) -> LbConfig:
    text = lab.lb_config.read_text().replace("${NTM_LAB_STATE}", str(lab.lab.state))
    return parse(text, str(lab.lb_config), check_interfaces=False)


def whoami(body: str) -> tuple[str, str]:
    fields = dict(part.split("=", 1) for part in body.split())
    return fields["server"], fields["client"]


def test_ipvsadm_shows_the_services_and_reals_the_agent_configured(
    lab: NtmLab, vips: dict[str, str]
) -> None:
    status = lab.status("lb")
    assert status["backend"] == "ipvs", status["backend_reason"]
    cfg = agent_config(lab)
    lines = [" ".join(ln.split()) for ln in lab.run("lb", "ipvsadm", "-Ln").splitlines()]
    for svc in (s.service for s in cfg.services):
        k = svc.key
        head = f"{k.protocol.value.upper()} {k.address}:{k.port} {svc.scheduler.value}"
        if svc.persistence:
            head += f" persistent {svc.persistence}"
        assert any(ln == head or ln.startswith(head + " ") for ln in lines), (head, lines)
        block = lines[lines.index(next(ln for ln in lines if ln.startswith(head))) + 1 :]
        block = block[: next((i for i, ln in enumerate(block) if not ln.startswith("->")), None)]
        for real in svc.reals:
            assert any(ln.startswith(f"-> {real.address}:{real.port} Masq 1 ") for ln in block), (
                real,
                block,
            )
        assert len(block) == len(svc.reals), block
    # The kernel, read back over netlink, holds exactly the configured state.
    backend = IpvsBackend(netns=lab.ns("lb"))
    try:
        assert backend.read() == normalise_state(cfg.desired())
    finally:
        backend.close()


def test_curl_from_mn1_reaches_a_web_server_that_sees_mn1s_vip(
    lab: NtmLab, vips: dict[str, str]
) -> None:
    # The user's own command, through `ntm lab exec`.
    page = lab.lab.exec("mn1", *CURL, URL, timeout=120).stdout
    server, client = whoami(page)
    assert server in WEBS.values() and client == vips["mn1"], page
    # The adaptor reads its counters through the xtables stand-in (a Python start-up and an
    # iptables-legacy-save inside UML, bounded at 5 s; {} when slower): poll, don't read once.
    wait_for(
        "ntma1's DNAT counter for tcp/80 above 0",
        lambda: lab.status("ntma1")["adaptor"]["nft_counters"]["tunnel tcp/80"] >= 1,
    )
    # IPVS itself saw mn1's vIP as the client of the virtual service.
    entries = lab.run("lb", "ipvsadm", "-Lnc")
    assert any(f" {vips['mn1']}:" in ln and " 10.30.0.100:80 " in ln for ln in entries.splitlines())


def test_lb_routes_mn1s_vip_back_through_ntma1(lab: NtmLab, vips: dict[str, str]) -> None:
    route = f"{vips['mn1']} via {NTMA_DMZ} dev dmz proto 78"
    wait_for(f"route {route!r} on the LB", lambda: route in lab.run("lb", "ip", "-4", "route"))
    held = lab.status("lb")["claims"]["held"]
    # the holder is the NTMA's certificate names, sorted and comma-joined
    assert any(
        h["vip"] == vips["mn1"] and "www.ntm.example.com" in h["holder"].split(",") for h in held
    ), held


def test_rr_spreads_30_new_connections_10_10_10(lab: NtmLab, vips: dict[str, str]) -> None:
    wait_for("all real servers in service", lambda: all_in_service(lab))
    loop = f"for i in $(seq 30); do {' '.join(CURL)} {URL}; echo; done"
    got = collections.Counter(
        ln.strip() for ln in lab.run("mn1", "sh", "-c", loop, timeout=300).splitlines() if ln
    )
    reals = [(r["address"], r["health"], r["last_change"]) for s in lab.status("lb")["services"]
             for r in s["reals"]]  # fmt: skip
    assert got == {f"server=web{n} client={vips['mn1']}": 10 for n in (1, 2, 3)}, (got, reals)


def test_persistence_keeps_mn1_on_one_server(lab: NtmLab, vips: dict[str, str]) -> None:
    wait_for("all real servers in service", lambda: all_in_service(lab))
    loop = f"for i in $(seq 10); do {' '.join(CURL)} {STICKY_URL}; echo; done"
    new_conns = collections.Counter(
        ln.strip() for ln in lab.run("mn1", "sh", "-c", loop, timeout=300).splitlines() if ln
    )
    kept = lab.run("mn1", *CURL, *[STICKY_URL] * 5).split()
    assert len(new_conns) == 1 and sum(new_conns.values()) == 10, new_conns
    (body,) = new_conns
    assert body.endswith(f"client={vips['mn1']}"), body
    assert " ".join(kept) == " ".join([body] * 5)
    # IPVS keeps the persistence template for mn1's vIP.
    templates = lab.run("lb", "ipvsadm", "-Lnc")
    assert any(f" {vips['mn1']}:0 " in ln and ":8080 " in ln for ln in templates.splitlines())


def test_udp_source_hashing_keeps_mn1_on_one_server(lab: NtmLab, vips: dict[str, str]) -> None:
    wait_for("all real servers in service", lambda: all_in_service(lab))
    service = next(s for s in agent_config(lab).services if s.service.key.protocol is Protocol.UDP)
    assert service.service.scheduler.value == "sh"
    address = lab.run("mn1", "getent", "hosts", "www.example.com").split()[0]
    replies = lab.run("mn1", "python3", "-S", "-c", UDP_ASK, address, "6").split("\n")
    replies = [r for r in replies if r]
    assert len(replies) == 6 and len(set(replies)) == 1, replies
    assert replies[0] in {f"{w} hello" for w in WEBS.values()}


def test_lane_used_the_files_it_says(lab: NtmLab) -> None:
    """The agent ran the lane's copy of lab/config/lb.toml, with the lab's services."""
    assert lab.status("lb")["config"] == str(lab.lb_config)
    repo_cfg = Path(__file__).resolve().parents[2] / "lab/config/lb.toml"
    ours = agent_config(lab).desired()
    theirs = parse(
        repo_cfg.read_text().replace("${NTM_LAB_STATE}", str(lab.lab.state)),
        str(repo_cfg),
        check_interfaces=False,
    ).desired()
    assert ours == theirs
