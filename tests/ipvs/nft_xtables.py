"""A stand-in `nft` for the NTMA inside User-Mode Linux: the same rules through xtables.

Debian's UML kernel (6.1um) is built without the nf_tables ip, ip6 and inet families
(CONFIG_NF_TABLES_IPV4/IPV6/INET unset; only `bridge` exists), so `nft add table ip ...`
fails with EOPNOTSUPP there. It does have the legacy xtables NAT (iptable_nat, xt_nat,
xt_conntrack, xt_comment). The UML lane puts this program first on the NTMA's PATH as `nft`:
it translates the one ruleset shape adaptor/forwarding.py writes (DNAT in a prerouting nat
chain, SNAT of adopted flows in a postrouting nat chain, a forward filter chain) into
iptables-legacy rules with the same matches, verdicts and comments, and answers
`nft -j list table ip T` with their packet counters. Anything it does not recognise is an
error (exit 1), never silently ignored: if the adaptor's ruleset grows, this lane fails
loudly until the translation follows.

Only the tests use it; the NTMA itself is unchanged. Stdlib only, so the lane runs it with
`python -S` (no site module), whose start-up costs least inside UML.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# (nft hook, nft chain type) -> (xtables table, built-in chain, suffix of our chain)
HOOKS = {
    ("prerouting", "nat"): ("nat", "PREROUTING", "pre"),
    ("forward", "filter"): ("filter", "FORWARD", "fwd"),
    ("postrouting", "nat"): ("nat", "POSTROUTING", "post"),
}
VERDICTS = {"accept": "ACCEPT", "drop": "DROP"}


class TranslateError(ValueError):
    """The ruleset uses something this stand-in does not translate."""


@dataclass
class Chain:
    table: str  # xtables table: nat or filter
    builtin: str  # the hook's built-in chain, which jumps to ours
    name: str  # our chain, e.g. ntm_adaptor_ntma1_pre
    policy: str = "ACCEPT"  # appended as the last rule (a base chain's policy)
    rules: list[list[str]] = field(default_factory=list)


@dataclass
class Script:
    """What one `nft -f` input asks for, in order: tables to delete, chains to create."""

    deletes: list[str] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)


def chain_name(table: str, suffix: str) -> str:
    name = f"{table}_{suffix}"
    if len(name) > 28:  # XT_EXTENSION_MAXNAMELEN - 1
        raise TranslateError(f"chain name {name!r} is longer than xtables allows (28)")
    return name


def translate_rule(tokens: Sequence[str]) -> list[str]:
    """One nft rule statement (tokens, quotes removed) -> iptables arguments after -A CHAIN."""
    out: list[str] = []
    i = 0

    def take(n: int) -> list[str]:
        nonlocal i
        if i + n > len(tokens):
            raise TranslateError(f"rule ends early: {shlex.join(tokens)}")
        got = list(tokens[i : i + n])
        i += n
        return got

    verdict: list[str] = []
    comment: list[str] = []
    while i < len(tokens):
        word = take(1)[0]
        if word in ("iifname", "oifname"):
            flag = "-i" if word == "iifname" else "-o"
            value = take(1)[0]
            if value == "!=":
                out += ["!", flag, take(1)[0]]
            else:
                out += [flag, value]
        elif word == "ip":
            key, value = take(2)
            if key not in ("daddr", "saddr"):
                raise TranslateError(f"ip {key} is not translated")
            out += ["-d" if key == "daddr" else "-s", value]
        elif word in ("tcp", "udp"):
            key, value = take(2)
            if key not in ("dport", "sport"):
                raise TranslateError(f"{word} {key} is not translated")
            out += ["-p", word, f"--{key}", value]
        elif word == "ct":
            key, value = take(2)
            if key == "state":
                out += ["-m", "conntrack", "--ctstate", value.upper()]
            elif key == "status" and value == "dnat":
                # the IPS_DST_NAT bit: xt_conntrack has it as the pseudo-state DNAT
                out += ["-m", "conntrack", "--ctstate", "DNAT"]
            else:
                raise TranslateError(f"ct {key} is not translated")
        elif word == "counter":
            continue  # xtables counts every rule anyway
        elif word == "dnat":
            to, target = take(2)
            if to != "to":
                raise TranslateError(f"dnat {to} is not translated")
            verdict = ["-j", "DNAT", "--to-destination", target]
        elif word == "snat":
            to, target = take(2)
            if to != "to":
                raise TranslateError(f"snat {to} is not translated")
            verdict = ["-j", "SNAT", "--to-source", target]
        elif word in VERDICTS:
            verdict = ["-j", VERDICTS[word]]
        elif word == "comment":
            comment = ["-m", "comment", "--comment", take(1)[0]]
        else:
            raise TranslateError(f"{word!r} is not translated (rule: {shlex.join(tokens)})")
    if not verdict:
        raise TranslateError(f"rule without a verdict: {shlex.join(tokens)}")
    return out + comment + verdict


_HEADER = re.compile(
    r"type (?P<type>\w+) hook (?P<hook>\w+) priority [\w-]+; policy (?P<policy>\w+);"
)


def parse(text: str) -> Script:
    """Parse `nft -f` input of the shape adaptor/forwarding.py writes."""
    script = Script()
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    table: str | None = None
    chain: Chain | None = None
    for line in lines:
        words = shlex.split(line)
        if table is None:
            if words[:2] == ["delete", "table"] and len(words) == 4 and words[2] == "ip":
                script.deletes.append(words[3])
            elif words[:2] == ["table", "ip"] and len(words) == 3:
                pass  # "make sure it exists" before a delete: nothing to do here
            elif words[:2] == ["table", "ip"] and len(words) == 4 and words[3] == "{":
                table = words[2]
            else:
                raise TranslateError(f"line not translated: {line}")
        elif chain is None:
            if words[:1] == ["chain"] and len(words) == 3 and words[2] == "{":
                chain = Chain("", "", words[1])
            elif line == "}":
                table = None
            else:
                raise TranslateError(f"line not translated: {line}")
        elif line == "}":
            if not chain.table:
                raise TranslateError(f"chain {chain.name} has no `type ... hook ...` line")
            script.chains.append(chain)
            chain = None
        elif m := _HEADER.fullmatch(line):
            key = (m["hook"], m["type"])
            if key not in HOOKS or m["policy"] not in VERDICTS:
                raise TranslateError(f"chain header not translated: {line}")
            chain.table, chain.builtin, suffix = HOOKS[key]
            chain.name = chain_name(table, suffix)
            chain.policy = VERDICTS[m["policy"]]
        else:
            chain.rules.append(translate_rule(words))
    if table is not None or chain is not None:
        raise TranslateError("unbalanced braces in the ruleset")
    return script


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=10, check=False
    )


Run = Callable[[list[str], str | None], "subprocess.CompletedProcess[str]"]


def _ours(table: str) -> list[tuple[str, str, str]]:
    """(xtables table, built-in chain, our chain) for every chain an nft table may own."""
    return [(t, b, chain_name(table, s)) for t, b, s in HOOKS.values()]


def _quote(arg: str) -> str:
    if '"' in arg or "\\" in arg:
        raise TranslateError(f"cannot quote {arg!r} for iptables-restore")
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg


def restore_input(script: Script, saved: str) -> str:
    """iptables-legacy-restore --noflush input that carries out `script`, given what
    `iptables-legacy-save` shows now: one transaction per xtables table.

    Declaring a chain (`:NAME - [0:0]`) creates it or, if it exists, empties it; jumps to it
    that exist now are removed first, so a repeated apply never doubles them."""
    existing: dict[str, set[str]] = {}  # xtables table -> chains
    jumps: dict[tuple[str, str, str], int] = {}  # (table, builtin, chain) -> count
    current = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith(":"):
            existing.setdefault(current, set()).add(line[1:].split()[0])
        elif m := re.fullmatch(r"(?:\[\d+:\d+\] )?-A (\S+) -j (\S+)", line):
            key = (current, m[1], m[2])
            jumps[key] = jumps.get(key, 0) + 1
    blocks: dict[str, list[str]] = {}
    deleted = {c for t in script.deletes for c in _ours(t)}
    created = {(c.table, c.builtin, c.name): c for c in script.chains}
    for xt, builtin, name in sorted(deleted | set(created)):
        lines = blocks.setdefault(xt, [])
        if name in existing.get(xt, set()) or (xt, builtin, name) in created:
            lines.append(f":{name} - [0:0]")
        lines += [f"-D {builtin} -j {name}"] * jumps.get((xt, builtin, name), 0)
        chain = created.get((xt, builtin, name))
        if chain is None:
            if name in existing.get(xt, set()):
                lines.append(f"-X {name}")
            continue
        lines += [f"-A {name} " + " ".join(map(_quote, rule)) for rule in chain.rules]
        if chain.policy != "ACCEPT":
            lines.append(f"-A {name} -j {chain.policy}")
        lines.append(f"-A {builtin} -j {name}")
    out = []
    for xt, lines in sorted(blocks.items()):
        if lines:
            out += [f"*{xt}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def apply(script: Script, run: Run = _run) -> bool:
    """Carry out the script in one iptables-legacy-restore call; True if it changed anything."""
    saved = run(["iptables-legacy-save"], None)
    if saved.returncode != 0:
        raise TranslateError(f"iptables-legacy-save: {saved.stderr.strip()}")
    text = restore_input(script, saved.stdout)
    if not text:
        return False
    done = run(["iptables-legacy-restore", "--noflush"], text)
    if done.returncode != 0:
        raise TranslateError(f"iptables-legacy-restore: {done.stderr.strip()}\n{text}")
    return True


def counters(table: str, run: Run = _run) -> dict[str, object] | None:
    """`nft -j list table ip T` as JSON with each commented rule's packet counter (from one
    `iptables-legacy-save -c`); None when the table's chains do not exist."""
    ours = {(xt, name) for xt, _builtin, name in _ours(table)}
    rules: list[dict[str, object]] = []
    present = False
    current = ""
    for line in run(["iptables-legacy-save", "-c"], None).stdout.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith(":") and (current, line[1:].split()[0]) in ours:
            present = True
        elif (m := re.match(r"\[(\d+):(\d+)\] -A (\S+) (.*)", line)) and (current, m[3]) in ours:
            words = shlex.split(m[4])
            if "--comment" in words:
                comment = words[words.index("--comment") + 1]
                expr = [{"counter": {"packets": int(m[1]), "bytes": int(m[2])}}]
                rules.append({"rule": {"family": "ip", "table": table, "chain": m[3],
                                       "comment": comment, "expr": expr}})  # fmt: skip
    if not present:
        return None
    return {"nftables": [{"table": {"family": "ip", "name": table}}, *rules]}


def main(argv: Sequence[str], stdin: str) -> int:
    try:
        if list(argv) == ["-f", "-"]:
            apply(parse(stdin))
            return 0
        if len(argv) == 5 and argv[:4] == ["-j", "list", "table", "ip"]:
            doc = counters(argv[4])
            if doc is None:
                print(f"Error: No such file or directory: table ip {argv[4]}", file=sys.stderr)
                return 1
            print(json.dumps(doc))
            return 0
        if len(argv) == 4 and argv[:3] == ["delete", "table", "ip"]:
            return 0 if apply(Script(deletes=[argv[3]])) else 1
        raise TranslateError(f"arguments not translated: {shlex.join(argv)}")
    except TranslateError as error:
        print(f"nft (xtables stand-in of the UML lane): {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args, sys.stdin.read() if args == ["-f", "-"] else ""))
