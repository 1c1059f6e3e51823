"""Layer-3 TUN device: create, configure with pyroute2, and move packets in batches.

The fd is non-blocking: callers register `fileno()` with `loop.add_reader` and call
`read_batch()` when it is readable. Writes never block; a full queue drops the packet
(and counts it), because the tunnel is a datagram path and stalling the loop would
hurt every other flow. `write_batch()` hands the kernel runs of TCP segments (or of UDP
datagrams) as one packet (IFF_VNET_HDR, see `ntm_io.tun_offload`): one pass through its
receive path per run instead of per packet. Reads take no offloads (no TUNSETOFFLOAD):
cutting a 64 KiB TSO packet back into segments would need a TCP checksum per segment
computed in Python, about twice the cost of sealing it (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ntm_io.config import ConfigError
from ntm_io.tun_offload import GSO_UDP_L4, VNET_HDR_NONE, VNET_HDR_SIZE, coalesce

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

ROOT_NEEDED = "creating a TUN device needs root (CAP_NET_ADMIN)"

# Room above the MTU so an oversized packet is detected (read fills the buffer)
# instead of being silently truncated to exactly the buffer size.
_READ_SLACK = 256

T = TypeVar("T")


class TunPermissionError(ConfigError, PermissionError):
    """Not allowed to create or configure the TUN device.

    A ConfigError so `ntm` prints it as `ntm: error: …` without a traceback, and a
    PermissionError so callers that think in OSErrors can catch it too.
    """


def run_sync_netlink(fn: Callable[[], T]) -> T:
    """Run blocking pyroute2 code from sync or async context.

    pyroute2 0.9's sync `IPRoute` drives a private event loop with run_until_complete,
    which fails inside a running loop; there it runs in a one-off worker thread. The
    calls it wraps are one-time setup/teardown, so briefly blocking the caller is fine.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ntm-netlink") as ex:
        return ex.submit(fn).result()


def _is_eperm(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, OSError):
        code = exc.errno
    return code in (errno.EPERM, errno.EACCES)


class TunDevice:
    """One IFF_TUN | IFF_NO_PI device owned by this process (gone when closed).

    With `vnet_hdr` (the default) the device also has IFF_VNET_HDR, so `write_batch` can
    hand the kernel a run of TCP segments or UDP datagrams as one packet
    (`ntm_io.tun_offload`); reads and single writes look the same to callers either way.
    A kernel that refuses the flag gets a plain device.
    """

    def __init__(self, name: str = "ntm0", mtu: int = 1400, vnet_hdr: bool = True) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(f"TUN name {name!r} must be 1-{IFNAMSIZ - 1} bytes long")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(
                f"{TUN_PATH} does not exist; load the tun module (modprobe tun) or, in a "
                "container, pass the device through (--device /dev/net/tun)"
            ) from None
        except PermissionError:
            raise TunPermissionError(ROOT_NEEDED) from None
        try:
            res = self._set_iff(fd, name, vnet_hdr)
        except OSError as exc:
            os.close(fd)
            if _is_eperm(exc):
                raise TunPermissionError(ROOT_NEEDED) from None
            if exc.errno == errno.EBUSY:
                raise ConfigError(
                    f"TUN device {name} is already in use by another process; stop it or "
                    "choose another tun name"
                ) from None
            raise
        self._fd: int = fd
        self.name: str = res[:IFNAMSIZ].rstrip(b"\0").decode()
        self.mtu: int = mtu
        self.vnet_hdr: bool = bool(self._flags & IFF_VNET_HDR)
        self._hdr = VNET_HDR_SIZE if self.vnet_hdr else 0
        self._alloc(mtu)
        self.packets_read = 0
        self.packets_written = 0
        self.write_drops = 0  # queue full (EAGAIN) or device down (EIO)
        self.read_drops = 0  # larger than the read buffer (MTU raised behind our back)
        self.coalesced_writes = 0  # writes that carried several segments or datagrams
        self.coalesce_refused = 0  # merged writes the kernel refused (then: one by one)
        self._coalesce = self.vnet_hdr
        self._coalesce_udp = self.vnet_hdr

    def _set_iff(self, fd: int, name: str, vnet_hdr: bool) -> bytes:
        flags = IFF_TUN | IFF_NO_PI
        if vnet_hdr:
            try:
                ifr = struct.pack("16sH22x", name.encode(), flags | IFF_VNET_HDR)
                res: bytes = fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info("%s: no IFF_VNET_HDR here (%s): one write per packet", name, exc)
            else:
                self._flags = flags | IFF_VNET_HDR
                return res
        self._flags = flags
        return bytes(fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags)))

    def _alloc(self, mtu: int) -> None:
        # One buffer for the life of the device; readv fills it without allocating.
        self._buf = bytearray(max(mtu, 1280) + _READ_SLACK + self._hdr)
        self._view = memoryview(self._buf)
        self._bufs = [self._buf]

    # -- configuration -------------------------------------------------------------

    def configure(
        self,
        address: str,
        prefix_len: int | None = None,
        mtu: int | None = None,
        routes: Sequence[str] = (),
    ) -> None:
        """Bring the link up with `address`, `mtu`, and `routes` (CIDRs) into the TUN.

        Idempotent: repeating it changes nothing; a different address replaces the old
        one of its family. Routes are added or replaced, never removed. Routes of the
        address's family get `src=address` so locally originated packets into the TUN
        carry the virtual IP. Blocks briefly; callable from inside a running loop.
        """
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"TUN address {address!r} is not an IP address") from None
        plen = addr.max_prefixlen if prefix_len is None else prefix_len
        if not 0 <= plen <= addr.max_prefixlen:
            raise ConfigError(f"prefix length /{plen} is not valid for {addr}")
        nets = []
        for cidr in routes:
            try:
                nets.append(ipaddress.ip_network(cidr))
            except ValueError:
                raise ConfigError(
                    f"route {cidr!r} is not a network; write it like 100.64.0.0/10"
                ) from None
        new_mtu = self.mtu if mtu is None else mtu
        if not 68 <= new_mtu <= 65535:
            raise ConfigError(f"TUN mtu {new_mtu} is out of range [68, 65535]")
        try:
            run_sync_netlink(lambda: self._configure(addr, plen, new_mtu, nets))
        except Exception as exc:
            if _is_eperm(exc):
                raise TunPermissionError(ROOT_NEEDED) from None
            raise
        if new_mtu != self.mtu:
            self.mtu = new_mtu
            self._alloc(new_mtu)

    def _configure(
        self,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
        plen: int,
        mtu: int,
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        from pyroute2 import IPRoute  # deferred: importing pyroute2 costs ~100 ms
        from pyroute2.netlink.exceptions import NetlinkError

        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        with IPRoute() as ipr:
            idx = self._index(ipr)
            ipr.link("set", index=idx, mtu=mtu, state="up")
            have = False
            for msg in ipr.addr("dump", index=idx, family=family):
                local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if local is None or msg["family"] != family:
                    continue
                if ipaddress.ip_address(local) == addr and msg["prefixlen"] == plen:
                    have = True
                elif msg["scope"] == 0:  # keep link-local fe80::, drop a stale vIP
                    ipr.addr("del", index=idx, address=local, prefixlen=msg["prefixlen"])
            if not have:
                try:
                    ipr.addr("add", index=idx, address=str(addr), prefixlen=plen)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            for net in nets:
                spec: dict[str, Any] = {"dst": str(net), "oif": idx}
                if net.version == addr.version:
                    spec["prefsrc"] = str(addr)
                ipr.route("replace", **spec)
        log.info(
            "%s: up, %s/%d mtu %d, routes %s",
            self.name,
            addr,
            plen,
            mtu,
            ", ".join(map(str, nets)) or "none",
        )

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if not found:
            raise OSError(errno.ENODEV, f"TUN device {self.name} vanished")
        return int(found[0])

    # -- data path -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        """Read up to `max_packets` packets; stops early when the queue is empty."""
        out: list[bytes] = []
        fd, bufs, view, size, hdr = self._fd, self._bufs, self._view, len(self._buf), self._hdr
        readv, append = os.readv, out.append
        for _ in range(max_packets):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if n >= size or (hdr and view[1]):
                # Truncated, or a GSO packet we never asked for (no TUNSETOFFLOAD):
                # forwarding a torn packet is worse than dropping it.
                self.read_drops += 1
                continue
            append(bytes(view[hdr:n]))
        self.packets_read += len(out)
        return out

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Inject one IP packet; False (and counted) when it had to be dropped."""
        return self._write([VNET_HDR_NONE, packet] if self._hdr else [packet], 1)

    def _write(self, buffers: list[Any], packets: int) -> bool:
        try:
            os.writev(self._fd, buffers)
        except BlockingIOError:
            self.write_drops += packets
            return False
        except OSError as exc:
            # EIO: link administratively down; EINVAL: not an IP packet. Neither
            # should take the data path down with it.
            if exc.errno not in (errno.EIO, errno.EINVAL):
                raise
            self.write_drops += packets
            return False
        self.packets_written += packets
        return True

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Inject packets in order, runs of TCP segments or UDP datagrams of one flow
        merged (with `vnet_hdr`); returns how many packets were accepted."""
        if not self._coalesce or len(packets) == 1:
            return sum(1 for p in packets if self.write(p))
        accepted = 0
        for buffers, originals in coalesce(packets, udp=self._coalesce_udp):
            n = len(originals)
            if n == 1:
                accepted += self._write(buffers, 1)
                continue
            try:
                os.writev(self._fd, buffers)
            except BlockingIOError:
                self.write_drops += n
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    self.write_drops += n
                    continue
                if exc.errno != errno.EINVAL:
                    raise
                # This kernel does not take this kind of GSO write (UDP needs Linux 6.2):
                # that kind goes one packet per write from now on.
                udp = bytes(buffers[0])[1] == GSO_UDP_L4
                log.warning("%s: merged %s write refused (%s); not merging those any more",
                            self, "UDP" if udp else "TCP", exc)  # fmt: skip
                if udp:
                    self._coalesce_udp = False
                else:
                    self._coalesce = False
                self.coalesce_refused += 1
                accepted += sum(1 for p in originals if self.write(p))
                continue
            self.coalesced_writes += 1
            self.packets_written += n
            accepted += n
        return accepted

    # -- lifetime ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; the kernel deletes a non-persistent TUN device with it."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TunDevice({self.name!r}, mtu={self.mtu}, fd={self._fd})"
