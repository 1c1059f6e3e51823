"""TOML configuration helpers shared by every daemon."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A user's configuration is wrong. The message says what and how to fix it."""


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass --config with an existing TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc}); fix the syntax at that spot") from None
    result: dict[str, Any] = expand(data)
    return result


def expand(value: Any) -> Any:
    """Expand ${VAR} in every string (used for ${NTM_LAB_STATE} in lab configs)."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


class Section:
    """Typed, checked access to one table of a config file; errors name the key."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self._data = data
        self.where = where
        self._used: set[str] = set()

    def _get(self, key: str, default: Any, kind: type | tuple[type, ...], what: str) -> Any:
        self._used.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise ConfigError(f"[{self.where}] {key} is missing; set it to {what}")
            return default
        value = self._data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"[{self.where}] {key} = {value!r} is not {what}; write it as {what}")
        return value

    def text(self, key: str, default: Any = None, what: str = "a string") -> Any:
        return self._get(key, _REQUIRED if default is None else default, str, what)

    def opt_text(self, key: str) -> str | None:
        return self._get(key, None, str, "a string")  # type: ignore[no-any-return]

    def integer(
        self, key: str, default: Any = None, lo: int | None = None, hi: int | None = None
    ) -> Any:
        v = self._get(key, _REQUIRED if default is None else default, int, "an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"[{self.where}] {key} = {v} is out of range [{lo}, {hi}]")
        return v

    def number(self, key: str, default: Any = None, lo: float | None = None) -> Any:
        v = self._get(key, _REQUIRED if default is None else default, (int, float), "a number")
        if lo is not None and v < lo:
            raise ConfigError(f"[{self.where}] {key} = {v} must be at least {lo}")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool, "true or false")  # type: ignore[no-any-return]

    def texts(self, key: str, default: Any = None) -> list[str]:
        v = self._get(key, _REQUIRED if default is None else default, list, "a list of strings")
        if not all(isinstance(x, str) for x in v):
            raise ConfigError(f"[{self.where}] {key} must be a list of strings")
        return list(v)

    def ip(self, key: str, default: Any = None) -> Any:
        v = self.text(key, default, "an IP address")
        return parse_ip(v, f"[{self.where}] {key}")

    def ip_list(self, key: str, default: Any = None) -> list[str]:
        return [parse_ip(v, f"[{self.where}] {key}") for v in self.texts(key, default)]

    def network(
        self, key: str, default: Any = None
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        v = self.text(key, default, "a network like 100.64.0.0/16")
        try:
            return ipaddress.ip_network(v)
        except ValueError:
            raise ConfigError(
                f"[{self.where}] {key} = {v!r} is not a network; write it like 100.64.0.0/16 "
                "with the host bits zero"
            ) from None

    def check_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(
                f"[{self.where}] unknown key(s) {', '.join(unknown)}; check the spelling "
                "against the documented options"
            )


def parse_ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP address") from None


def section(data: dict[str, Any], name: str, required: bool = True) -> Section:
    table = data.get(name)
    if table is None:
        if required:
            raise ConfigError(f"the [{name}] table is missing from the config file; add it")
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(f"{name} must be a table ([{name}]), not a value")
    return Section(table, name)


class _Required:
    pass


_REQUIRED: Any = _Required()
