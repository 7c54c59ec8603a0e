"""Addresses: which local address reaches a peer, and whether an address is this machine's.

A refit's store listens on one address and every rank connects to it; each rank's gloo group
listens on an address its peers can reach. On one machine that is loopback; across machines
it must be a routable address of the node, not whatever the host name resolves to (often
``127.0.1.1``). `local_address_for(peer)` asks the kernel which local address it would use
to reach `peer` (a UDP "connect" sends nothing), and `routable_address()` is that address for
an arbitrary outside peer: the address of the interface with the default route.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_loopback", "is_local", "local_address_for", "routable_address"]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_address_for(peer: str, port: int = 9) -> str:
    """The local address this machine would use to reach `peer` (loopback for loopback)."""
    if is_loopback(peer):
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, port))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def routable_address() -> str:
    """This machine's address on the interface with the default route (loopback if none)."""
    return local_address_for("10.255.255.255")


def is_local(host: str) -> bool:
    """Whether `host` is loopback or one of this machine's own addresses."""
    if is_loopback(host):
        return True
    return host in (routable_address(), local_address_for(host))
