"""Error types of the protocol core.

Split as h11 does: a RemoteProtocolError means the peer sent something wrong (drop it,
count it, answer with an error); a LocalProtocolError means our own code misused the API.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error the protocol core raises."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: the input is dropped and counted, never fatal."""


class DecodeError(RemoteProtocolError):
    """Bytes that are not a valid message. `reason` is a short, stable counter key."""

    reason = "malformed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class UnsupportedVersion(DecodeError):
    reason = "bad_version"


class UnknownMessageType(DecodeError):
    reason = "bad_type"


class LengthError(DecodeError):
    reason = "bad_length"


class FieldError(DecodeError):
    reason = "bad_field"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


class AuthenticationError(RemoteProtocolError):
    """A packet failed AEAD authentication or a handshake did not verify."""

    reason = "auth_failed"


class ReplayError(RemoteProtocolError):
    """A packet's counter was already seen or fell behind the replay window."""

    reason = "replayed"


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol does not allow."""
