"""`ntm lb`: the LB host agent daemon.

Start: load the config (nothing touched if it is bad) -> pick the backend and say why ->
check the config fits it -> sysctls -> reconcile the kernel to the file -> health checks,
route-claim server, status socket. SIGHUP re-reads the file: a bad file is logged and the
running state kept. Health results change the *effective* state (failing reals removed or
weighted 0) and are reconciled like any other change. On exit the kernel state stays (a
restart must not drop connections) unless --flush-on-exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from functools import partial
from typing import Any

from ntm_io.config import ConfigError
from ntm_io.status import serve_status

from . import config as lb_config
from .backend import Backend
from .claims import ClaimBook
from .config import LbConfig, ServiceConfig
from .health import Monitor
from .model import LbState, RealServer, ServiceKey
from .nft_backend import NftBackend, unsupported
from .routes import ClaimService, KernelCall, KernelThread, NetlinkRoutes, inline

log = logging.getLogger("ntm.lb")

MonitorKey = tuple[ServiceKey, str, int]


def ipvs_available() -> tuple[bool, str]:
    """Does this kernel have IPVS? (resolving the genetlink family also autoloads ip_vs)"""
    if os.path.exists("/proc/net/ip_vs"):
        return True, "IPVS is available (/proc/net/ip_vs exists)"
    try:
        from pyroute2.netlink.generic import GenericNetlinkSocket

        sock = GenericNetlinkSocket()
        try:
            sock.bind("IPVS", None)
        finally:
            sock.close()
        return True, "IPVS is available (genetlink family IPVS resolves)"
    except Exception:
        return False, (
            "IPVS not available in this kernel (no /proc/net/ip_vs, no genetlink family "
            "IPVS; `modprobe ip_vs` if the module exists)"
        )


def choose_backend(cfg: LbConfig) -> tuple[Backend, str]:
    """The backend the config asks for, and a sentence saying which and why."""
    if cfg.backend == "nftables":
        return _nft(cfg), 'using nftables: the config says backend = "nftables"'
    ok, why = ipvs_available()
    if cfg.backend == "ipvs" and not ok:
        raise ConfigError(
            f'{cfg.path}: [agent] backend = "ipvs" but {why}; load ip_vs or set '
            'backend = "auto" (falls back to nftables)'
        )
    if ok:
        try:
            from . import ipvs_backend
        except ImportError as exc:
            raise ConfigError(f"the IPVS backend cannot be loaded ({exc})") from None
        # The IPVS backend is a colleague's module; only its class name is assumed here.
        factory: Any = vars(ipvs_backend).get("IpvsBackend")
        if factory is None:
            raise ConfigError("lb_integration.ipvs_backend has no IpvsBackend class")
        backend: Backend = factory()
        return backend, f"{why}; using IPVS"
    return _nft(cfg), f"{why}; using nftables"


def _nft(cfg: LbConfig) -> NftBackend:
    return NftBackend(cfg.nft_table, lc_fallback=cfg.nft_lc_fallback)


def check_fits(cfg: LbConfig, backend: Backend) -> None:
    """Refuse a config the chosen backend cannot carry out (before touching anything)."""
    if backend.name != "nftables":
        return
    for svc in cfg.services:
        problems = unsupported(LbState((svc.service,)), cfg.nft_lc_fallback)
        if problems:
            line = svc.scheduler_line or svc.line
            raise ConfigError(f"{cfg.path}:{line}: [[service]] {svc.name!r}: {problems[0]}")
    for svc in cfg.services:
        if svc.service.scheduler.value in ("lc", "wlc"):
            log.warning(
                "service %s: %s is not possible with nftables; using %s as nft_lc_fallback says",
                svc.name,
                svc.service.scheduler.value,
                "rr" if svc.service.scheduler.value == "lc" else "wrr",
            )


def write_sysctl(name: str, value: str) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as fh:
            if fh.read().strip() == value:
                return
        with open(path, "w") as fh:
            fh.write(value)
        log.info("sysctl %s = %s", name, value)
    except OSError as exc:
        log.warning("cannot set sysctl %s = %s: %s", name, value, exc)


def set_sysctls(backend_name: str, state: LbState) -> None:
    # NAT forwarding: the real servers' replies are routed back through this host.
    if any(":" not in s.key.address for s in state.services):
        write_sysctl("net.ipv4.ip_forward", "1")
    if any(":" in s.key.address for s in state.services):
        write_sysctl("net.ipv6.conf.all.forwarding", "1")
    if backend_name == "ipvs":
        # expire_nodest_conn=1: drop connections of a deleted real at once instead of
        # black-holing them until they expire (5 min for UDP): kubernetes #71514.
        # expire_quiescent_template=1: persistent clients of a weight-0 (failed) real are
        # rescheduled. conntrack=1: the host's stateful nftables rules see IPVS flows.
        # (ipvs_backend.IPVS_SYSCTLS is the one list; the backend module sets them.)
        from .ipvs_backend import set_ipvs_sysctls

        try:
            for name, value in set_ipvs_sysctls().items():
                log.info("sysctl net.ipv4.vs.%s = %s", name, value)
        except Exception as exc:
            log.warning("cannot set the IPVS sysctls: %s", exc)


class LbAgent:
    def __init__(
        self,
        config: LbConfig,
        backend: Backend,
        *,
        flush_on_exit: bool = False,
        kernel: KernelCall[Any] = inline,
    ) -> None:
        self.config = config
        self.backend = backend
        self.kernel = kernel  # runs blocking kernel calls (see routes.KernelThread)
        self.flush_on_exit = flush_on_exit
        self.started = time.monotonic()
        self.monitors: dict[MonitorKey, Monitor] = {}
        self.claims: ClaimService | None = None
        self._closers: list[Any] = []
        self._apply_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = {"applies": 0, "apply_errors": 0, "reloads": 0}
        self.last_error: str | None = None
        self.last_apply_ops = 0
        self.backend_reason = ""
        self.applied = LbState()  # what the backend holds since the last successful apply
        self.last_reload: dict[str, Any] | None = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        set_sysctls(self.backend.name, cfg.desired())
        await self.apply()
        if self.last_error is not None:
            raise ConfigError(f"the first reconcile failed: {self.last_error}")
        self._sync_monitors()
        if cfg.claims is not None:
            await self._start_claims()
        self._closers.append(
            await serve_status(cfg.status_socket, self.status, started=self.started)
        )
        self._spawn(self._applier())
        log.info(
            "lb %s: %d service(s) on %s; status on %s",
            cfg.name,
            len(cfg.services),
            self.backend.name,
            cfg.status_socket,
        )

    async def _start_claims(self) -> None:
        from ntm_io.control import serve_control

        c = self.config.claims
        assert c is not None
        routes: NetlinkRoutes = await self.kernel(partial(NetlinkRoutes, c.interface, c.table))
        self.claims = ClaimService(
            ClaimBook(c.vip_networks, c.next_hop_networks, c.max_lifetime), routes, self.kernel
        )
        await self.claims.adopt_existing()
        self.claims.start()
        server = await serve_control(
            c.listen, c.port, ca=c.ca, cert=c.cert, key=c.key, handler=self.claims.handle
        )
        self._closers.append(server)
        log.info(
            "route claims on %s:%d (vIP networks %s)",
            c.listen,
            c.port,
            ", ".join(map(str, c.vip_networks)),
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for mon in self.monitors.values():
            await mon.stop()
        for closer in self._closers:
            closer.close()
        if self.claims is not None:
            await self.claims.stop()
            if self.flush_on_exit:
                await self.claims.remove_all()
        if self.flush_on_exit:
            async with self._apply_lock:
                await self.kernel(partial(self.backend.apply, LbState()))
                if isinstance(self.backend, NftBackend):
                    await self.kernel(self.backend.remove_table)
            log.info("flushed the load balancer state (--flush-on-exit)")
        else:
            log.info("leaving the kernel state in place (connections keep flowing)")
        await self.kernel(self.backend.close)
        if self.claims is not None:
            await self.kernel(self.claims.routes.close)

    # -- reload ---------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the file; on any error keep running as before and say why."""
        try:
            new = lb_config.load(self.config.path)
            check_fits(new, self.backend)
            if new.claims != self.config.claims:
                log.warning("[claims] changed: restart the agent to apply it (kept the old one)")
                new = dataclasses.replace(new, claims=self.config.claims)
        except ConfigError as exc:
            self.last_error = f"reload refused: {exc}"
            self.last_reload = {"ok": False, "error": str(exc), "ops": 0}
            self.counters["reloads"] += 1
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        self.config = new
        set_sysctls(self.backend.name, new.desired())
        self._sync_monitors()
        await self.apply()
        self.last_reload = {
            "ok": self.last_error is None,
            "error": self.last_error,
            "ops": self.last_apply_ops,
        }
        self.counters["reloads"] += 1  # counted when done, so status readers see the result
        log.info("reloaded %s: %d change(s)", new.path, self.last_apply_ops)

    def _sync_monitors(self) -> None:
        """Keep monitors (and their UP/DOWN state) of reals whose check did not change."""
        wanted: dict[MonitorKey, tuple[ServiceConfig, RealServer]] = {}
        for svc in self.config.services:
            for r in svc.service.reals:
                wanted[(svc.service.key, r.address, r.port)] = (svc, r)
        for key in list(self.monitors):
            mon = self.monitors[key]
            if key not in wanted or wanted[key][0].health != mon.check:
                self._spawn(mon.stop())
                del self.monitors[key]
        for key, (svc, r) in wanted.items():
            if key not in self.monitors:
                host = f"[{r.address}]" if ":" in r.address else r.address
                mon = Monitor(
                    f"{svc.name} real {host}:{r.port}",
                    svc.health,
                    r.address,
                    r.port,
                    self._dirty.set,
                )
                self.monitors[key] = mon
                mon.start()

    # -- applying -------------------------------------------------------------------------

    def effective(self) -> LbState:
        """The config's state with health applied: DOWN reals removed or at weight 0."""
        services = []
        for svc in self.config.services:
            reals = []
            for r in svc.service.reals:
                mon = self.monitors.get((svc.service.key, r.address, r.port))
                if mon is None or mon.up:
                    reals.append(r)
                elif svc.health.on_failure == "weight0":
                    reals.append(dataclasses.replace(r, weight=0))
            services.append(dataclasses.replace(svc.service, reals=tuple(reals)))
        return LbState(tuple(services))

    async def apply(self) -> None:
        async with self._apply_lock:
            state = self.effective()
            try:
                # nft / netlink calls are short but blocking: keep them off the loop
                await self.kernel(partial(self.backend.apply, state))
            except Exception as exc:
                self.counters["apply_errors"] += 1
                self.last_error = f"apply failed: {exc}"
                log.error("applying the load balancer state failed: %s", exc)
                return
            self.counters["applies"] += 1
            self.applied = state
            self.last_error = None
            ops = getattr(self.backend, "last_ops", None)
            self.last_apply_ops = len(ops) if ops is not None else -1
            if self.last_apply_ops:
                log.info("reconciled: %d change(s)", self.last_apply_ops)

    async def _applier(self) -> None:
        """Health flips set _dirty; coalesce bursts into one apply."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.apply()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        # in_service / effective_weight come from what was applied, not what health wants
        # now: status must never claim the kernel already did something it has not.
        eff = self.applied.by_key()
        services = []
        for svc in self.config.services:
            h = svc.health
            held = eff.get(svc.service.key)
            applied = {(r.address, r.port): r for r in (held.reals if held else ())}
            reals = []
            for r in svc.service.reals:
                mon = self.monitors.get((svc.service.key, r.address, r.port))
                now = applied.get((r.address, r.port))
                reals.append(
                    {
                        "address": r.address,
                        "port": r.port,
                        "weight": r.weight,
                        "effective_weight": None if now is None else now.weight,
                        "in_service": now is not None and now.weight > 0,
                        "health": "unchecked"
                        if mon is None or h.kind == "none"
                        else ("up" if mon.up else "down"),
                        "last_check": None if mon is None else mon.health.last_result,
                        "last_change": None if mon is None else mon.health.last_change,
                        "checks": 0 if mon is None else mon.health.checks,
                    }
                )
            k = svc.service.key
            services.append(
                {
                    "name": svc.name,
                    "address": k.address,
                    "port": k.port,
                    "protocol": k.protocol.value,
                    "scheduler": svc.service.scheduler.value,
                    "persistence": svc.service.persistence,
                    "persistence_netmask": svc.service.persistence_netmask,
                    "health": {
                        "kind": h.kind,
                        "interval_s": h.interval,
                        "timeout_s": h.timeout,
                        "rise": h.rise,
                        "fall": h.fall,
                        "on_failure": h.on_failure,
                        "detection_s": h.detection_s,
                        "recovery_s": h.recovery_s,
                    },
                    "reals": reals,
                }
            )
        return {
            "role": "lb",
            "name": self.config.name,
            "config": self.config.path,
            "backend": self.backend.name,
            "backend_reason": self.backend_reason,
            "services": services,
            "claims": None if self.claims is None else self.claims.status(),
            "last_error": self.last_error,
            "last_apply_ops": self.last_apply_ops,
            "last_reload": self.last_reload,
            "counters": dict(self.counters),
        }


async def run(config: LbConfig, *, flush_on_exit: bool = False) -> None:
    kernel = KernelThread()
    try:
        backend, why = await kernel(partial(choose_backend, config))
        log.info("%s", why)
        check_fits(config, backend)
        agent = LbAgent(config, backend, flush_on_exit=flush_on_exit, kernel=kernel)
        agent.backend_reason = why
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: agent._spawn(agent.reload()))
        try:
            await agent.start()
            await stop.wait()
        finally:
            await agent.close()
    finally:
        kernel.shutdown()
