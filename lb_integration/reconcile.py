"""Diff two LbStates into the operations that turn one into the other (pure, no kernel).

Only what differs is touched: an unchanged service or real server yields no operation, so
applying the desired state to itself is empty (idempotent), and a reload that edits one real
server leaves every other one alone (their connections and persistence entries live on).

Order (safe for a backend that applies operations one by one, like IPVS over netlink):
new services first, then service edits, then new and edited reals, and only then deletions,
so a service never passes through "no real server" on its way from one set to another.
Deleting a service deletes its reals with it, so no DeleteReal is emitted for those.
"""

from __future__ import annotations

import dataclasses

from .model import LbState, RealServer, ServiceKey, VirtualService


@dataclasses.dataclass(frozen=True)
class AddService:
    service: VirtualService  # reals follow as AddReal operations


@dataclasses.dataclass(frozen=True)
class EditService:
    old: VirtualService
    new: VirtualService  # scheduler / persistence changed; reals are separate operations


@dataclasses.dataclass(frozen=True)
class DeleteService:
    service: VirtualService


@dataclasses.dataclass(frozen=True)
class AddReal:
    key: ServiceKey
    real: RealServer


@dataclasses.dataclass(frozen=True)
class EditReal:
    key: ServiceKey
    old: RealServer
    new: RealServer  # weight or forwarding changed


@dataclasses.dataclass(frozen=True)
class DeleteReal:
    key: ServiceKey
    real: RealServer


Operation = AddService | EditService | DeleteService | AddReal | EditReal | DeleteReal

RealKey = tuple[str, int]


def real_key(real: RealServer) -> RealKey:
    return (real.address, real.port)


def key_order(k: ServiceKey) -> tuple[str, int, str]:
    """A total order on services (Protocol, an Enum, has none of its own)."""
    return (k.address, k.port, k.protocol.value)


def _settings(s: VirtualService) -> VirtualService:
    """The service without its reals: what EditService compares."""
    return dataclasses.replace(s, reals=())


def diff(current: LbState, desired: LbState) -> list[Operation]:
    cur, want = current.by_key(), desired.by_key()
    adds: list[Operation] = []
    edits: list[Operation] = []
    real_adds: list[Operation] = []
    real_edits: list[Operation] = []
    real_deletes: list[Operation] = []
    deletes: list[Operation] = []
    for key in sorted(want, key=key_order):
        new = want[key]
        old = cur.get(key)
        if old is None:
            adds.append(AddService(_settings(new)))
            old_reals: dict[RealKey, RealServer] = {}
        else:
            if _settings(old) != _settings(new):
                edits.append(EditService(_settings(old), _settings(new)))
            old_reals = {real_key(r): r for r in old.reals}
        new_reals = {real_key(r): r for r in new.reals}
        for rk in sorted(new_reals):
            r = new_reals[rk]
            if rk not in old_reals:
                real_adds.append(AddReal(key, r))
            elif old_reals[rk] != r:
                real_edits.append(EditReal(key, old_reals[rk], r))
        for rk in sorted(old_reals):
            if rk not in new_reals:
                real_deletes.append(DeleteReal(key, old_reals[rk]))
    for key in sorted(cur, key=key_order):
        if key not in want:
            deletes.append(DeleteService(cur[key]))
    return adds + edits + real_adds + real_edits + real_deletes + deletes


def apply_ops(state: LbState, ops: list[Operation]) -> LbState:
    """What a backend holds after carrying out `ops` on `state` (the reference semantics)."""
    services = {k: dataclasses.replace(s) for k, s in state.by_key().items()}
    reals: dict[ServiceKey, dict[RealKey, RealServer]] = {
        k: {real_key(r): r for r in s.reals} for k, s in services.items()
    }
    for op in ops:
        if isinstance(op, AddService):
            if op.service.key in services:
                raise ValueError(f"service {op.service.key} exists already")
            services[op.service.key] = _settings(op.service)
            reals[op.service.key] = {}
        elif isinstance(op, EditService):
            services[op.new.key] = _settings(op.new)
        elif isinstance(op, DeleteService):
            del services[op.service.key]
            del reals[op.service.key]
        elif isinstance(op, AddReal):
            if real_key(op.real) in reals[op.key]:
                raise ValueError(f"real {op.real} exists already in {op.key}")
            reals[op.key][real_key(op.real)] = op.real
        elif isinstance(op, EditReal):
            reals[op.key][real_key(op.new)] = op.new
        else:
            del reals[op.key][real_key(op.real)]
    return canonical(
        LbState(
            tuple(
                dataclasses.replace(s, reals=tuple(reals[k].values())) for k, s in services.items()
            )
        )
    )


def canonical(state: LbState) -> LbState:
    """Services and reals in a fixed order, so equal states compare equal."""
    return LbState(
        tuple(
            dataclasses.replace(s, reals=tuple(sorted(s.reals, key=real_key)))
            for s in sorted(state.services, key=lambda s: key_order(s.key))
        )
    )


def touched(ops: list[Operation]) -> set[ServiceKey]:
    """The services an operation list changes (a backend rebuilds per-service objects)."""
    out: set[ServiceKey] = set()
    for op in ops:
        if isinstance(op, AddService | DeleteService):
            out.add(op.service.key)
        elif isinstance(op, EditService):
            out.add(op.new.key)
        else:
            out.add(op.key)
    return out
