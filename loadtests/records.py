"""Reading what the load processes recorded: `records-*.jsonl` files in one directory.

Each Locust process (standalone, or every worker) appends one JSON object per line: a `meta`
line, one `session` line per finished session, one `user` line per stopped user (with its DNS
lookups: a user that never resolved the name has no session), and a `timeline` at the end.
Lines that do not parse (a process killed mid-write) are counted and skipped, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import EventRecord, SessionRecord, Timeline, UserRecord


@dataclass
class RunData:
    sessions: list[SessionRecord] = field(default_factory=list)
    users: list[UserRecord] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)
    metas: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0
    bad_lines: int = 0


def parse_lines(lines: list[str], into: RunData) -> None:
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            kind = doc.get("type")
            if kind == "session":
                into.sessions.append(SessionRecord.from_json(doc))
            elif kind == "user":
                into.users.append(UserRecord.from_json(doc))
            elif kind == "timeline":
                into.timeline.merge(Timeline.from_json(doc))
            elif kind == "meta":
                into.metas.append(doc)
            else:
                into.bad_lines += 1
        except (ValueError, TypeError, KeyError, AttributeError):
            into.bad_lines += 1


def read_records(folder: Path) -> RunData:
    data = RunData()
    for path in sorted(folder.glob("records-*.jsonl")):
        data.files += 1
        parse_lines(path.read_text(errors="replace").splitlines(), data)
    data.sessions.sort(key=lambda s: (s.start, s.user))
    return data


def write_events(path: Path, events: list[EventRecord]) -> None:
    path.write_text(json.dumps([e.to_json() for e in events], indent=2) + "\n")


def read_events(path: Path) -> list[EventRecord]:
    if not path.exists():
        return []
    return [EventRecord.from_json(d) for d in json.loads(path.read_text())]
