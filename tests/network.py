"""Whether this machine can reach a host (tests of offline behaviour skip when it can)."""

from __future__ import annotations

import socket


def online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False
