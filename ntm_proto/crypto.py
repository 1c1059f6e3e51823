"""Static keys, the tunnel handshake, and per-direction AEAD keys.

Every node owns a static X25519 key pair; the DC relays only the public half (Route
Direction), so both ends of a path know each other's static public key before they talk
and the DC never learns a tunnel key. The handshake is one round trip in the spirit of
Noise KK / WireGuard (see `ntm_proto.packet` for the 108-byte packet layout).

Notation: S_i/S_r static keys of initiator/responder, e_i/e_r ephemeral keys,
DH(a, B) X25519, H = SHA-256, HKDF = HKDF-SHA256 with salt = path_id, `||` concatenation,
`prefix_x` = the 12-byte packet prefix (type, epoch, reserved, path_id)::

    h0  = H(PROTOCOL || path_id || S_i.pub || S_r.pub)          identities bound up front
    INIT  (initiator -> responder): prefix_i || e_i.pub || AEAD(k1, TunnelRequest)
        dh1 = DH(e_i, S_r)     dh2 = DH(S_i, S_r)
        h1  = H(h0 || prefix_i || e_i.pub)
        k1  = HKDF(dh1 || dh2, info = "ntm init" || h1)
        h2  = H(h1 || sealed INIT payload)
    RESP  (responder -> initiator): prefix_r || e_r.pub || AEAD(k2, TunnelResponse)
        dh3 = DH(e_i, e_r)     dh4 = DH(e_r, S_i)
        h3  = H(h2 || prefix_r || e_r.pub)
        k2  = HKDF(dh1 || dh2 || dh3 || dh4, info = "ntm resp" || h3)
        h4  = H(h3 || sealed RESP payload)
    session: HKDF(dh1 || dh2 || dh3 || dh4, info = "ntm session" || h4, 64 bytes)
        -> first 32 bytes initiator->responder key, last 32 bytes responder->initiator key

Why it holds: sealing k1 needs S_i's or S_r's private key (dh2), so only the initiator the
DC named can produce an INIT that opens; k2 needs dh1 (S_r or e_i) and dh4 (S_i or e_r),
so only the named responder can answer; a wrong static key on either side means a wrong
k1/k2 and an `AuthenticationError`. dh3 gives forward secrecy: once both ephemerals are
dropped, stealing both static keys later does not reveal the session keys. An INIT
carries the initiator's wall-clock ns timestamp (strictly increasing per path); the
responder remembers the largest it accepted, so a replayed INIT is refused (the path
enforces that, see `ntm_proto.path`). Each handshake key seals exactly once, so its nonce
is all zero.

Transport: AES-256-GCM, nonce = 4 zero bytes || counter (u64 big-endian), counter starting
at 0 and growing by one per packet per direction and epoch; a sender refuses to go past
`REJECT_AFTER_MESSAGES` (2^60). Receivers check the counter against a `ReplayWindow` before
decrypting and record it only after the tag verified.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from collections import deque
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import (
    AuthenticationError,
    FieldError,
    LengthError,
    LocalProtocolError,
    ReplayError,
)
from .messages import TunnelRequest, TunnelResponse, decode_as, encode
from .packet import (
    HANDSHAKE_PAYLOAD_SIZE,
    HEADER_SIZE,
    KEY_SIZE,
    PATH_ID_SIZE,
    PREFIX_SIZE,
    HandshakePacket,
    PacketType,
    build_prefix,
    parse,
)
from .replay import ReplayWindow

PROTOCOL = b"NTMobile-tunnel-v1 X25519 AES-256-GCM SHA-256"
REJECT_AFTER_MESSAGES = 1 << 60
_NONCE_PREFIX = bytes(4)
_ZERO_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw


class KeyExhausted(LocalProtocolError):
    """A send key reached `REJECT_AFTER_MESSAGES`; a new handshake is required."""


# --- static keys ---------------------------------------------------------------------------


SHARED_CACHE_MAX = 4096  # peers whose DH(static, static) a node remembers


class StaticKey:
    """A node's long-term X25519 key pair."""

    __slots__ = ("_private", "_public", "_shared")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self._public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        # DH with a peer's static key never changes: one scalar multiplication per peer,
        # not per path (it is as secret as the private key it sits beside).
        self._shared: dict[bytes, bytes] = {}

    @classmethod
    def generate(cls) -> StaticKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> StaticKey:
        if len(data) != KEY_SIZE:
            raise ValueError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def public_bytes(self) -> bytes:
        return self._public

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with a peer's raw public key; `ValueError` for a bad or low-order key."""
        shared = self._shared.get(peer_public)
        if shared is None:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
            if len(self._shared) >= SHARED_CACHE_MAX:
                del self._shared[next(iter(self._shared))]  # the oldest peer
            self._shared[bytes(peer_public)] = shared
        return shared

    def dump(self) -> bytes:
        """The private key as one base64 line (what a key file holds)."""
        return base64.b64encode(self.private_bytes()) + b"\n"

    @classmethod
    def load(cls, data: bytes) -> StaticKey:
        """Read `dump` output (base64, surrounding whitespace ignored) or 32 raw bytes."""
        if len(data) == KEY_SIZE:
            return cls.from_private_bytes(data)
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            raise ValueError("a private key file holds one base64 line") from None
        return cls.from_private_bytes(raw)

    def __repr__(self) -> str:
        return f"StaticKey(public={encode_public_key(self._public)})"


def save_private_key(key: StaticKey) -> bytes:
    return key.dump()


def load_private_key(data: bytes) -> StaticKey:
    return StaticKey.load(data)


def encode_public_key(public: bytes) -> str:
    return base64.b64encode(public).decode()


def decode_public_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError(f"{text!r} is not base64") from None
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a public key is {KEY_SIZE} bytes, got {len(raw)}")
    return raw


# --- transport keys ------------------------------------------------------------------------


class SendKey:
    """Seals transport packets for one direction and epoch; owns the send counter."""

    __slots__ = ("_aead", "_control_prefix", "_data_prefix", "counter")

    def __init__(self, key: bytes, epoch: int, path_id: bytes) -> None:
        self._aead = AESGCM(key)  # one cipher object per key: setup cost paid once
        self._data_prefix = build_prefix(PacketType.DATA, epoch, path_id)
        self._control_prefix = build_prefix(PacketType.CONTROL, epoch, path_id)
        self.counter = 0  # the next counter to use; never reused

    def seal(self, plaintext: bytes, control: bool = False) -> bytes:
        n = self.counter
        if n >= REJECT_AFTER_MESSAGES:
            raise KeyExhausted("send key used up; rekey first")
        self.counter = n + 1
        ctr = n.to_bytes(8, "big")
        header = (self._control_prefix if control else self._data_prefix) + ctr
        return header + self._aead.encrypt(_NONCE_PREFIX + ctr, plaintext, header)


class RecvKey:
    """Opens transport packets for one direction and epoch, behind a replay window."""

    __slots__ = ("_aead", "window")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.window = ReplayWindow()

    def open(self, data: bytes, counter: int) -> bytes:
        """Authenticate and decrypt `data` (a whole transport packet with this `counter`).

        Raises `ReplayError` for a counter already seen or too old, `AuthenticationError`
        when the tag does not verify; only a verified packet moves the window.
        """
        window = self.window
        if counter >= REJECT_AFTER_MESSAGES or not window.check(counter):
            raise ReplayError(f"counter {counter} replayed or too old")
        try:
            nonce = _NONCE_PREFIX + data[PREFIX_SIZE:HEADER_SIZE]
            plaintext = self._aead.decrypt(nonce, data[HEADER_SIZE:], data[:HEADER_SIZE])
        except InvalidTag:
            raise AuthenticationError("transport packet failed authentication") from None
        window.update(counter)
        return plaintext


@dataclasses.dataclass(slots=True)
class TransportKeys:
    """The result of a handshake: one key per direction for `epoch` (a generation count)."""

    epoch: int
    send: SendKey
    recv: RecvKey


# --- handshake -----------------------------------------------------------------------------


class Ephemeral:
    """One handshake's ephemeral X25519 key pair; used for exactly one INIT or RESP."""

    __slots__ = ("private", "public")

    def __init__(self) -> None:
        self.private = X25519PrivateKey.generate()
        self.public = _public(self.private)


class EphemeralSource:
    """Ephemeral keys made ahead of need: generating one costs two scalar multiplications,
    which a handshake should not wait for. `take` hands each key out once (a fresh one when
    none is ready) and calls `on_low` when fewer than `keep` are left; the owner then calls
    `refill` off the critical path (e.g. on its event loop's next pass)."""

    __slots__ = ("_keep", "_ready", "on_low")

    def __init__(self, keep: int = 2, on_low: Callable[[], None] | None = None) -> None:
        self._keep = keep
        self._ready: deque[Ephemeral] = deque()
        self.on_low = on_low

    def take(self) -> Ephemeral:
        key = self._ready.popleft() if self._ready else Ephemeral()
        if self.on_low is not None and len(self._ready) < self._keep:
            self.on_low()
        return key

    @property
    def low(self) -> bool:
        return len(self._ready) < self._keep

    def refill(self) -> None:
        while len(self._ready) < self._keep:
            self._ready.append(Ephemeral())


def _hash(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _dh(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # low-order point: all-zero shared secret
        raise AuthenticationError("peer ephemeral key is a low-order point") from None


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _pad(msg: TunnelRequest | TunnelResponse) -> bytes:
    raw = encode(msg)
    if len(raw) > HANDSHAKE_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{type(msg).__name__} does not fit the handshake payload")
    return raw + bytes(HANDSHAKE_PAYLOAD_SIZE - len(raw))


def _unpad(plaintext: bytes) -> bytes:
    """The encoded message at the start of a padded payload (codec header gives its size)."""
    size = 4 + int.from_bytes(plaintext[2:4], "big")
    if size > len(plaintext):
        raise LengthError(f"message of {size} bytes in a {len(plaintext)}-byte payload")
    if any(plaintext[size:]):
        raise FieldError("padding", "handshake padding is not zero")
    return plaintext[:size]


class HandshakeContext:
    """What one path's handshakes share: identities, DH(S_i, S_r) and h0, computed once."""

    __slots__ = ("_h0", "_peer_key", "_ss", "initiator", "local", "path_id", "peer_public")

    def __init__(
        self, local: StaticKey, peer_public: bytes, path_id: bytes, *, initiator: bool
    ) -> None:
        if len(path_id) != PATH_ID_SIZE:
            raise LocalProtocolError(f"path id must be {PATH_ID_SIZE} bytes")
        if len(peer_public) != KEY_SIZE:
            raise LocalProtocolError(f"peer static key must be {KEY_SIZE} bytes")
        try:
            self._ss = local.exchange(peer_public)
        except ValueError:
            raise LocalProtocolError("peer static key is a low-order point") from None
        self.local = local
        self.peer_public = peer_public
        self.path_id = path_id
        self.initiator = initiator
        self._peer_key = X25519PublicKey.from_public_bytes(peer_public)
        mine = local.public_bytes()
        pubs = (mine, peer_public) if initiator else (peer_public, mine)
        self._h0 = _hash(PROTOCOL, path_id, *pubs)

    def initiate(
        self, epoch: int, request: TunnelRequest, ephemeral: Ephemeral | None = None
    ) -> Initiation:
        """Build a HANDSHAKE_INIT for key generation `epoch` (initiator side); `ephemeral`
        must be a key never used before (default: a fresh one)."""
        if not self.initiator:
            raise LocalProtocolError("only the initiator sends HANDSHAKE_INIT")
        eph = ephemeral or Ephemeral()
        e = eph.private
        aad = build_prefix(PacketType.HANDSHAKE_INIT, epoch, self.path_id) + eph.public
        dh1 = _dh(e, self._peer_key)
        h1 = _hash(self._h0, aad)
        k1 = _hkdf(dh1 + self._ss, self.path_id, b"ntm init" + h1)
        sealed = AESGCM(k1).encrypt(_ZERO_NONCE, _pad(request), aad)
        return Initiation(self, epoch, request, aad + sealed, e, dh1, _hash(h1, sealed))

    def receive_initiation(self, data: bytes) -> IncomingInitiation:
        """Authenticate a HANDSHAKE_INIT (responder side). Creates no lasting state.

        Raises `DecodeError` subclasses for bad framing, `AuthenticationError` if it was
        not sealed by the expected initiator for this path.
        """
        if self.initiator:
            raise LocalProtocolError("only the responder receives HANDSHAKE_INIT")
        pkt = self._parse(data, PacketType.HANDSHAKE_INIT)
        e_i = X25519PublicKey.from_public_bytes(pkt.ephemeral)
        dh1 = _dh(self.local._private, e_i)
        h1 = _hash(self._h0, pkt.aad)
        k1 = _hkdf(dh1 + self._ss, self.path_id, b"ntm init" + h1)
        try:
            plaintext = AESGCM(k1).decrypt(_ZERO_NONCE, pkt.sealed, pkt.aad)
        except InvalidTag:
            raise AuthenticationError("handshake init failed authentication") from None
        request = decode_as(_unpad(plaintext), TunnelRequest)
        return IncomingInitiation(self, pkt.epoch, request, e_i, dh1, _hash(h1, pkt.sealed))

    def _parse(self, data: bytes, expected: PacketType) -> HandshakePacket:
        pkt = parse(data)
        if pkt.type is not expected or not isinstance(pkt, HandshakePacket):
            raise FieldError("type", f"expected {expected.name}, got {pkt.type.name}")
        if pkt.path_id != self.path_id:
            raise FieldError("path_id", "handshake for another path")
        return pkt

    def _session(self, ikm: bytes, h4: bytes, epoch: int) -> TransportKeys:
        okm = _hkdf(ikm, self.path_id, b"ntm session" + h4, 2 * KEY_SIZE)
        i2r, r2i = okm[:KEY_SIZE], okm[KEY_SIZE:]
        send, recv = (i2r, r2i) if self.initiator else (r2i, i2r)
        return TransportKeys(epoch, SendKey(send, epoch, self.path_id), RecvKey(recv))


class Initiation:
    """An INIT in flight: holds the ephemeral private key until the response arrives."""

    __slots__ = ("_ctx", "_dh1", "_e", "_h2", "epoch", "packet", "request")

    def __init__(
        self,
        ctx: HandshakeContext,
        epoch: int,
        request: TunnelRequest,
        packet: bytes,
        e: X25519PrivateKey,
        dh1: bytes,
        h2: bytes,
    ) -> None:
        self._ctx = ctx
        self.epoch = epoch
        self.request = request
        self.packet = packet
        self._e: X25519PrivateKey | None = e
        self._dh1 = dh1
        self._h2 = h2

    def complete(self, data: bytes) -> tuple[TunnelResponse, TransportKeys]:
        """Authenticate the HANDSHAKE_RESP and derive the session (usable once)."""
        e = self._e
        if e is None:
            raise LocalProtocolError("handshake already completed")
        ctx = self._ctx
        pkt = ctx._parse(data, PacketType.HANDSHAKE_RESP)
        if pkt.epoch != self.epoch & 0xFF:
            raise AuthenticationError("handshake response for another epoch")
        e_r = X25519PublicKey.from_public_bytes(pkt.ephemeral)
        ikm = self._dh1 + ctx._ss + _dh(e, e_r) + _dh(ctx.local._private, e_r)
        h3 = _hash(self._h2, pkt.aad)
        k2 = _hkdf(ikm, ctx.path_id, b"ntm resp" + h3)
        try:
            plaintext = AESGCM(k2).decrypt(_ZERO_NONCE, pkt.sealed, pkt.aad)
        except InvalidTag:
            raise AuthenticationError("handshake response failed authentication") from None
        response = decode_as(_unpad(plaintext), TunnelResponse)
        self._e = None  # forward secrecy: the ephemeral is no longer needed
        return response, ctx._session(ikm, _hash(h3, pkt.sealed), self.epoch)


class IncomingInitiation:
    """An authenticated INIT the responder has not answered yet."""

    __slots__ = ("_ctx", "_dh1", "_e_i", "_h2", "epoch", "request")

    def __init__(
        self,
        ctx: HandshakeContext,
        epoch: int,
        request: TunnelRequest,
        e_i: X25519PublicKey,
        dh1: bytes,
        h2: bytes,
    ) -> None:
        self._ctx = ctx
        self.epoch = epoch  # the wire byte (mod 256)
        self.request = request
        self._e_i = e_i
        self._dh1 = dh1
        self._h2 = h2

    def accept(
        self,
        response: TunnelResponse,
        generation: int,
        ephemeral: Ephemeral | None = None,
    ) -> tuple[bytes, TransportKeys]:
        """Build the HANDSHAKE_RESP and the session keys for key generation `generation`;
        `ephemeral` must be a key never used before (default: a fresh one)."""
        ctx = self._ctx
        if generation & 0xFF != self.epoch:
            raise LocalProtocolError("generation does not match the INIT's epoch byte")
        eph = ephemeral or Ephemeral()
        e = eph.private
        aad = build_prefix(PacketType.HANDSHAKE_RESP, self.epoch, ctx.path_id) + eph.public
        ikm = self._dh1 + ctx._ss + _dh(e, self._e_i) + _dh(e, ctx._peer_key)
        h3 = _hash(self._h2, aad)
        k2 = _hkdf(ikm, ctx.path_id, b"ntm resp" + h3)
        sealed = AESGCM(k2).encrypt(_ZERO_NONCE, _pad(response), aad)
        return aad + sealed, ctx._session(ikm, _hash(h3, sealed), generation)


__all__ = [
    "REJECT_AFTER_MESSAGES",
    "Ephemeral",
    "EphemeralSource",
    "HandshakeContext",
    "IncomingInitiation",
    "Initiation",
    "KeyExhausted",
    "RecvKey",
    "SendKey",
    "StaticKey",
    "TransportKeys",
    "decode_public_key",
    "encode_public_key",
    "load_private_key",
    "save_private_key",
]
