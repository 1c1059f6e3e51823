"""Reports of a load run: the JSON summary, the verdict as text, and three PNG plots.

backends_over_time.png   answers per second per backend (and failures), events marked
clients_per_backend.png  the balance unit (client or session) per backend vs expectation
interruptions.png        per event: every alive stream's longest gap in the event window
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .expect import ServiceExpectation
from .model import EventRecord, Timeline
from .verdict import Verdict, quantile

PLOTS = ("backends_over_time.png", "clients_per_backend.png", "interruptions.png")
MAX_LISTED_VIOLATIONS = 200


def summary(
    verdict: Verdict,
    events: Sequence[EventRecord],
    expectations: Sequence[ServiceExpectation],
    run: dict[str, Any],
) -> dict[str, Any]:
    t = verdict.totals
    span = max(0.0, t["last_end"] - t["first_start"])
    return {
        "verdict": "pass" if verdict.ok else "fail",
        "exit_code": verdict.exit_code,
        "run": run,
        "totals": {**t, "span_s": span, "answers_per_s": t["answers"] / span if span else 0.0},
        "checks": [
            {"name": c.name, "status": c.status, "summary": c.summary, "details": c.details}
            for c in verdict.checks
        ],
        "expectations": [e.to_json() for e in expectations],
        "balance": [asdict(b) for b in verdict.balances],
        "violations": {
            "count": len(verdict.violations),
            "listed": [asdict(v) for v in verdict.violations[:MAX_LISTED_VIOLATIONS]],
        },
        "events": [e.to_json() for e in events],
        "interruptions": [
            {
                "event": i.label,
                "at": i.at,
                "streams": i.streams,
                "interrupted": i.interrupted,
                "unrecovered": i.unrecovered,
                "p50_s": i.quantile(0.5),
                "p90_s": i.quantile(0.9),
                "p99_s": i.quantile(0.99),
                "max_s": max(i.values, default=0.0),
                "by_kind": {
                    k: {
                        "streams": len(v),
                        "interrupted": sum(x > 0 for x in v),
                        "p50_s": quantile(v, 0.5),
                        "max_s": max(v, default=0.0),
                    }
                    for k, v in i.by_kind().items()
                },
            }
            for i in verdict.interruptions
        ],
    }


def verdict_lines(verdict: Verdict) -> list[str]:
    lines = [f"  [{c.status:4}] {c.name}: {c.summary}" for c in verdict.checks]
    for b in verdict.balances:
        counts = ", ".join(
            f"{k}={b.counts.get(k, 0)} (exp {b.expected.get(k, 0):.1f})"
            for k in sorted(set(b.counts) | set(b.expected))
        )
        lines.append(f"         {b.kind}/{b.port} {b.unit}s per backend: {counts}")
    for i in verdict.interruptions:
        per_kind = "; ".join(
            f"{k} {sum(x > 0 for x in v)}/{len(v)} interrupted, p50 {quantile(v, 0.5):.2f} s, "
            f"p99 {quantile(v, 0.99):.2f} s, max {max(v, default=0.0):.2f} s"
            for k, v in sorted(i.by_kind().items())
        )
        lines.append(f"         event {i.label}: {per_kind or 'no stream alive'}")
    lines.append(f"verdict: {'PASS' if verdict.ok else 'FAIL'}")
    return lines


def write_summary(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


# -- plots ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _mark_events(ax: Any, events: Sequence[EventRecord], t0: float, label: bool) -> None:
    for e in events:
        x = e.started_at - t0
        ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
        if label:
            ax.annotate(
                e.label,
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
            )


def plot_timeline(path: Path, timeline: Timeline, events: Sequence[EventRecord], t0: float) -> None:
    plt = _pyplot()
    kinds = sorted(set(timeline.answers) | set(timeline.failures)) or ["http"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.2 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        ax = axes[row][0]
        seconds = timeline.answers.get(kind, {})
        backends = sorted({b for c in seconds.values() for b in c})
        # every second of the run, so a second without answers shows as 0, not as a slope
        xs = list(range(min(seconds), max(seconds) + 1)) if seconds else []
        for b in backends:
            ax.plot([x - t0 for x in xs], [seconds.get(x, {}).get(b, 0) for x in xs], label=b)
        fails = timeline.failures.get(kind, {})
        if fails:
            fx = sorted(fails)
            ax.bar([x - t0 for x in fx], [fails[x] for x in fx], color="red", label="failed")
        _mark_events(ax, events, t0, row == 0)
        ax.set_title(f"{kind}: answers per second per backend")
        ax.set_ylabel("per second")
        ax.legend(loc="lower left", fontsize=8)
    axes[-1][0].set_xlabel("seconds since the run started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_balance(path: Path, verdict: Verdict) -> None:
    plt = _pyplot()
    n = max(1, len(verdict.balances))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    if not verdict.balances:
        axes[0][0].text(0.5, 0.5, "no service checked", ha="center")
    for col, b in enumerate(verdict.balances):
        ax = axes[0][col]
        names = sorted(set(b.counts) | set(b.expected))
        ax.bar(names, [b.counts.get(k, 0) for k in names], color="tab:blue", label="observed")
        ax.scatter(names, [b.expected.get(k, 0) for k in names], color="black", marker="_", s=600)
        status = {True: "PASS", False: "FAIL", None: "n/a"}[b.ok]
        ax.set_title(f"{b.kind}/{b.port} {b.scheduler}: {b.unit}s per backend [{status}]")
        ax.set_ylabel(f"{b.unit}s (bar: observed, line: expected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_interruptions(path: Path, verdict: Verdict) -> None:
    plt = _pyplot()
    ints = verdict.interruptions
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ints) + 2), 4.5))
    if not ints:
        ax.text(0.5, 0.5, "no handover event was scheduled", ha="center", va="center")
        ax.set_axis_off()
    else:
        data = [i.values or [0.0] for i in ints]
        ax.boxplot(data, showfliers=False)
        colours = {"http": "tab:blue", "udp": "tab:orange"}
        for k, i in enumerate(ints, start=1):  # every stream as a point, spread sideways
            for j, (v, kind) in enumerate(zip(i.values, i.kinds, strict=True)):
                x = k + 0.3 * ((j * 0.618) % 1.0 - 0.5)
                ax.scatter([x], [v], s=8, color=colours.get(kind, "gray"), alpha=0.6)
        for kind, colour in colours.items():
            ax.scatter([], [], s=8, color=colour, label=kind)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(range(1, len(ints) + 1))
        ax.set_xticklabels([i.label for i in ints], rotation=20, ha="right", fontsize=8)
        for k, i in enumerate(ints, start=1):
            top = max(i.values, default=0.0)
            ax.annotate(
                f"max {top:.2f}s\n{i.interrupted}/{i.streams}",
                (k, top),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize=7,
            )
        ax.set_ylabel("longest gap per stream (s)")
        ax.set_title("interruption per event (each alive stream's longest gap)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(
    out: Path, verdict: Verdict, timeline: Timeline, events: Sequence[EventRecord], t0: float
) -> list[Path]:
    paths = [out / name for name in PLOTS]
    plot_timeline(paths[0], timeline, events, t0)
    plot_balance(paths[1], verdict)
    plot_interruptions(paths[2], verdict)
    return paths
