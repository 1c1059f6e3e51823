"""The UML lane's xtables stand-in for `nft` (nft_xtables.py): translation, without a kernel.

These run anywhere (host and UML); the lane inside UML proves the rules with real traffic.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from adaptor.config import AdaptorConfig, load
from adaptor.forwarding import ruleset

from . import nft_xtables as nx

REPO = Path(__file__).resolve().parents[2]
VIP = "100.64.0.7"


@pytest.fixture
def adaptor_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdaptorConfig:
    """lab/config/ntma1.toml, with empty files where its certificates would be."""
    (tmp_path / "pki").mkdir()
    for name in ("ca.pem", "ntma1.pem", "ntma1.key"):
        (tmp_path / "pki" / name).touch()
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    return load(REPO / "lab/config/ntma1.toml")


def test_the_adaptors_ruleset_translates_rule_for_rule(adaptor_cfg: AdaptorConfig) -> None:
    script = nx.parse(ruleset(adaptor_cfg, VIP))
    table = adaptor_cfg.nft_table
    assert script.deletes == [table]
    pre, post, fwd = script.chains
    assert (pre.table, pre.builtin, pre.name, pre.policy) == (
        "nat",
        "PREROUTING",
        f"{table}_pre",
        "ACCEPT",
    )
    tun, lb = adaptor_cfg.node.tun_name, adaptor_cfg.lb_address
    assert pre.rules[0] == ["-i", tun, "-d", VIP, "-p", "tcp", "--dport", "80", "-m", "comment",
                            "--comment", "tunnel tcp/80", "-j", "DNAT", "--to-destination",
                            f"{lb}:80"]  # fmt: skip
    assert len(pre.rules) == len(adaptor_cfg.forward) + len(adaptor_cfg.public_addresses) * len(
        adaptor_cfg.public_forward
    )
    assert all(r[:3] == ["!", "-i", tun] for r in pre.rules[len(adaptor_cfg.forward) :])
    # adopted flows (after a failover): the LB's packets toward a tunnel get the vIP back
    assert (post.table, post.builtin, post.name) == ("nat", "POSTROUTING", f"{table}_post")
    assert post.rules[0] == ["-o", tun, "-s", lb, "-p", "tcp", "--sport", "80", "-m", "comment",
                             "--comment", "adopted tcp/80", "-j", "SNAT", "--to-source",
                             f"{VIP}:80"]  # fmt: skip
    assert len(post.rules) == len(adaptor_cfg.forward)
    assert (fwd.table, fwd.builtin, fwd.policy) == ("filter", "FORWARD", "DROP")
    assert fwd.rules[0] == ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    assert fwd.rules[1][:6] == ["-m", "conntrack", "--ctstate", "DNAT", "-d", lb]
    adopted = ["ACCEPT"] * len(adaptor_cfg.forward)
    assert [r[-1] for r in fwd.rules] == ["ACCEPT", "ACCEPT", *adopted, "DROP", "DROP"]


def test_restore_input_replaces_what_is_there_without_doubling_jumps(
    adaptor_cfg: AdaptorConfig,
) -> None:
    script = nx.parse(ruleset(adaptor_cfg, VIP))
    t = adaptor_cfg.nft_table
    fresh = nx.restore_input(script, "")
    assert fresh.count(f"-A PREROUTING -j {t}_pre") == 1
    assert f"-D PREROUTING -j {t}_pre" not in fresh
    assert '--comment "tunnel tcp/80"' in fresh
    assert fresh.startswith("*filter\n") and fresh.count("COMMIT") == 2
    saved = (
        f"*nat\n:PREROUTING ACCEPT [0:0]\n:{t}_pre - [0:0]\n-A PREROUTING -j {t}_pre\nCOMMIT\n"
        f"*filter\n:FORWARD ACCEPT [0:0]\n:{t}_fwd - [0:0]\n-A FORWARD -j {t}_fwd\nCOMMIT\n"
    )
    again = nx.restore_input(script, saved)
    assert again.count(f"-D PREROUTING -j {t}_pre") == 1
    assert again.count(f"-A PREROUTING -j {t}_pre") == 1
    removal = nx.restore_input(nx.Script(deletes=[t]), saved)
    assert removal.splitlines() == [
        "*filter", f":{t}_fwd - [0:0]", f"-D FORWARD -j {t}_fwd", f"-X {t}_fwd", "COMMIT",
        "*nat", f":{t}_pre - [0:0]", f"-D PREROUTING -j {t}_pre", f"-X {t}_pre", "COMMIT",
    ]  # fmt: skip
    assert nx.restore_input(nx.Script(deletes=[t]), "") == ""


@pytest.mark.parametrize(
    "text",
    [
        "table inet x {\n chain y {\n type nat hook postrouting priority srcnat; policy accept;\n"
        " masquerade\n }\n}\n",
        "table ip x {\n chain y {\n type nat hook prerouting priority dstnat; policy accept;\n"
        " ip protocol icmp drop\n }\n}\n",
        "table ip x {\n chain y {\n type nat hook output priority -100; policy accept;\n"
        " udp dport 53 redirect to :5353\n }\n}\n",
        "table ip x {\n chain y {\n",
    ],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(nx.TranslateError):
        nx.parse(text)


def test_counters_come_from_the_commented_rules() -> None:
    saved = {
        "all": "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
        "*nat\n:PREROUTING ACCEPT [0:0]\n:t_pre - [0:0]\n[3:180] -A PREROUTING -j t_pre\n"
        "[2:120] -A t_pre -d 100.64.0.7/32 -i ntm0 -p tcp -m tcp --dport 80 -m comment "
        '--comment "tunnel tcp/80" -j DNAT --to-destination 10.30.0.100:80\nCOMMIT\n'
    }

    def run(argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        assert argv == ["iptables-legacy-save", "-c"]
        return subprocess.CompletedProcess(argv, 0, saved["all"], "")

    doc = nx.counters("t", run)
    assert doc is not None
    rules = [item["rule"] for item in json.loads(json.dumps(doc))["nftables"] if "rule" in item]
    assert rules == [
        {"family": "ip", "table": "t", "chain": "t_pre", "comment": "tunnel tcp/80",
         "expr": [{"counter": {"packets": 2, "bytes": 120}}]}
    ]  # fmt: skip
    saved["all"] = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
    assert nx.counters("t", run) is None


def test_unknown_arguments_fail_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert nx.main(["list", "ruleset"], "") == 1
    assert "not translated" in capsys.readouterr().err
