"""AddressWatcher's evaluation schedule, with scripted dumps instead of netlink."""

from __future__ import annotations

import asyncio

from ntm_io.netwatch import AddressSet, AddressWatcher

EMPTY = AddressSet()
OLD = AddressSet(ipv4=("10.10.1.100",), has_default_route_v4=True)
NEW = AddressSet(ipv4=("10.10.3.100",), has_default_route_v4=True)
LONG = 30.0  # a debounce no test waits out: reaching it means the look was not hurried


class ScriptedWatcher(AddressWatcher):
    """Each dump returns the next scripted set; `changes_during` marks dumps during which
    another netlink event arrived (as when a move's later steps land mid-dump)."""

    def __init__(self, script: list[AddressSet], changes_during: set[int], debounce: float):
        self.reports: list[AddressSet] = []
        super().__init__(self.reports.append, debounce=debounce)
        self.script = script
        self.changes_during = changes_during
        self.dumps = 0

    async def _dump(self) -> AddressSet:
        i = self.dumps
        self.dumps += 1
        if i in self.changes_during:
            self._dirty = True
        await asyncio.sleep(0)
        return self.script[min(i, len(self.script) - 1)]


def reports_before_the_debounce(watcher: ScriptedWatcher) -> list[AddressSet]:
    """Start from OLD with one event; return what was reported before any debounce ended."""

    async def main() -> list[AddressSet]:
        loop = asyncio.get_running_loop()
        watcher._loop = loop
        watcher.current = OLD
        watcher._dirty = True
        watcher._kick()
        task = watcher._task
        assert task is not None
        for _ in range(100):  # let every step that needs no timer run
            await asyncio.sleep(0)
        assert not task.done()  # parked in the debounce
        task.cancel()
        return list(watcher.reports)

    return asyncio.run(main())


def test_between_networks_a_change_during_the_dump_is_looked_at_at_once() -> None:
    w = ScriptedWatcher([EMPTY, NEW], changes_during={0}, debounce=LONG)
    assert reports_before_the_debounce(w) == [EMPTY, NEW]


def test_with_addresses_a_change_during_the_dump_waits_for_the_debounce() -> None:
    w = ScriptedWatcher([NEW, OLD], changes_during={0}, debounce=LONG)
    assert reports_before_the_debounce(w) == [NEW]
    assert w.dumps == 1


def test_the_hurried_look_happens_once_in_a_row() -> None:
    # Events keep arriving while no address is there: one immediate look, then the
    # debounce again, so an event storm cannot spin the loop.
    w = ScriptedWatcher([EMPTY, EMPTY, NEW], changes_during={0, 1}, debounce=LONG)
    assert reports_before_the_debounce(w) == [EMPTY]
    assert w.dumps == 2


def test_nothing_more_changing_means_no_second_look() -> None:
    w = ScriptedWatcher([EMPTY, NEW], changes_during=set(), debounce=LONG)
    assert reports_before_the_debounce(w) == [EMPTY]
    assert w.dumps == 1
