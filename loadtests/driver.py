"""The handover driver: lab actions on a schedule, each one time-stamped into the results.

An event is `OFFSET:ACTION:ARG...` (OFFSET in seconds after the run started):

    30:move:mn2:access-b         ntm lab move mn2 --to access-b
    60:kill:ntma1                ntm lab kill ntma1
    75:start:ntma1               ntm lab start ntma1
    90:link:ntma2:isp1:down      ntm lab link ntma2 isp1 down
    95:impair:access-a:5         ntm lab impair access-a --loss 5
    99:lab:VERB:ARG...           ntm lab VERB ARG... (any other lab verb, as written)

Events run one after another from the host (not inside a namespace), against a named lab.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ntm_io.config import ConfigError

from .model import EventRecord

COMMAND_TIMEOUT = 180.0  # `ntm lab start` waits for the service's healthcheck
OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class Event:
    offset: float
    action: str
    args: tuple[str, ...]

    def lab_args(self) -> list[str]:
        """`ntm lab` verb and arguments (before --name/--state are added)."""
        a = list(self.args)
        if self.action == "move":
            return ["move", a[0], "--to", a[1]]
        if self.action in ("kill", "start"):
            return [self.action, a[0]]
        if self.action == "link":
            return ["link", a[0], a[1], a[2]]
        if self.action == "impair":
            return ["impair", a[0], "--loss", a[1]]
        return a  # "lab": the verb and its arguments as given


# action -> (number of arguments or None for "at least one", usage)
ACTIONS: dict[str, tuple[int | None, str]] = {
    "move": (2, "OFFSET:move:SERVICE:NETWORK"),
    "kill": (1, "OFFSET:kill:SERVICE"),
    "start": (1, "OFFSET:start:SERVICE"),
    "link": (3, "OFFSET:link:SERVICE:NETWORK:down|up"),
    "impair": (2, "OFFSET:impair:NETWORK:LOSS_PERCENT"),
    "lab": (None, "OFFSET:lab:VERB:ARG..."),
}


def parse_event(text: str) -> Event:
    parts = text.split(":")
    usage = "; ".join(u for _, u in ACTIONS.values())
    if len(parts) < 2:
        raise ConfigError(f"event {text!r}: write OFFSET:ACTION:ARGS (one of: {usage})")
    try:
        offset = float(parts[0])
    except ValueError:
        raise ConfigError(
            f"event {text!r}: the offset {parts[0]!r} is not a number of seconds"
        ) from None
    if offset < 0:
        raise ConfigError(f"event {text!r}: the offset must be >= 0 seconds")
    action, args = parts[1], tuple(parts[2:])
    if action not in ACTIONS:
        raise ConfigError(f"event {text!r}: unknown action {action!r}; known: {usage}")
    want, form = ACTIONS[action]
    if (want is None and not args) or (want is not None and len(args) != want):
        raise ConfigError(f"event {text!r}: write it as {form}")
    if any(not a for a in args):
        raise ConfigError(f"event {text!r}: an argument is empty (two colons in a row?)")
    if action == "link" and args[2] not in ("down", "up"):
        raise ConfigError(f"event {text!r}: a link goes `down` or `up`, not {args[2]!r}")
    if action == "impair":
        try:
            loss = float(args[1])
        except ValueError:
            loss = -1.0
        if not 0 <= loss <= 100:
            raise ConfigError(f"event {text!r}: the loss is a percentage 0..100")
    return Event(offset, action, args)


def parse_schedule(texts: Sequence[str], duration: float | None = None) -> list[Event]:
    """Events sorted by offset; each must fall inside the run when its duration is known."""
    events = sorted((parse_event(t) for t in texts), key=lambda e: e.offset)
    if duration is not None:
        late = [e for e in events if e.offset >= duration]
        if late:
            raise ConfigError(
                f"event at {late[0].offset:g} s is not inside the {duration:g} s run; "
                "lengthen --duration or move the event earlier"
            )
    return events


def lab_command() -> list[str]:
    """How this driver calls `ntm lab` (the same interpreter, so the same install)."""
    return [sys.executable, "-m", "ntm_cli.main", "lab"]


def event_argv(event: Event, lab: str, state: str | None) -> list[str]:
    verb, *rest = event.lab_args()
    where = ["--name", lab] + (["--state", state] if state else [])
    return [*lab_command(), verb, *where, *rest]


Runner = Callable[[list[str]], tuple[int, str]]


def run_command(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {COMMAND_TIMEOUT:g} s"
    return done.returncode, (done.stdout + done.stderr)[-OUTPUT_TAIL:]


class Driver:
    """Runs a schedule against a lab in a thread; `records` fill in as events happen."""

    def __init__(
        self,
        events: Sequence[Event],
        lab: str,
        state: str | None,
        runner: Runner = run_command,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[EventRecord], None] | None = None,
    ) -> None:
        self.events = list(events)
        self.lab, self.state = lab, state
        self._runner, self._clock, self._on_event = runner, clock, on_event
        self.records: list[EventRecord] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, t0: float) -> None:
        self._thread = threading.Thread(target=self.run, args=(t0,), name="driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, t0: float) -> None:
        """Execute every event at t0 + offset (late if the one before took longer)."""
        for event in self.events:
            delay = t0 + event.offset - self._clock()
            if delay > 0 and self._stop.wait(delay):
                return
            if self._stop.is_set():
                return
            argv = event_argv(event, self.lab, self.state)
            rec = EventRecord(event.offset, event.action, list(event.args), argv)
            rec.started_at = self._clock()
            rec.rc, rec.output = self._runner(argv)
            rec.ended_at = self._clock()
            self.records.append(rec)
            if self._on_event is not None:
                self._on_event(rec)
