"""Python without a network: every socket connection to anything but this machine fails.

`install()` in a test's process (or first thing in a subprocess) makes a test prove that what it
runs needs no download: lm-evaluation-harness, `datasets` and `transformers` would otherwise
reach for the Hugging Face Hub."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkDisabled(OSError):
    pass


def _local(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # a Unix socket
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it would need DNS, which is the network


def _connect(self: socket.socket, address: Any) -> None:
    if not _local(address):
        raise NetworkDisabled(f"the network is disabled in this test: connection to {address!r} refused")
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    if not _local(address):
        raise NetworkDisabled(f"the network is disabled in this test: connection to {address!r} refused")
    return _real_connect_ex(self, address)


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if host not in (None, "localhost") and not _is_ip(host):
        raise NetworkDisabled(f"the network is disabled in this test: DNS lookup of {host!r} refused")
    return _real_getaddrinfo(host, *args, **kwargs)


def _is_ip(host: Any) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
        return True
    except ValueError:
        return False


_real_getaddrinfo = socket.getaddrinfo


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _getaddrinfo


def uninstall() -> None:
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _real_getaddrinfo
