"""The one way boatray starts or joins Ray, and the ports it picks.

`start_ray` joins the address given explicitly or through RAY_ADDRESS, or else starts a
private local instance: a bare `ray.init()` never joins whatever instance happens to run on
the machine.
"""

from __future__ import annotations

import os
import socket

import ray

from boatray.errors import BoatrayError

LOCAL = "local"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct TCP ports nobody listens on right now (held open together, so they
    differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def ray_address(address: str | None = None) -> str:
    """The address to use: `address`, else RAY_ADDRESS, else `local` (a new private instance)."""
    return address or os.environ.get("RAY_ADDRESS") or LOCAL


def start_ray(address: str | None = None, **kwargs) -> None:
    """Join the Ray cluster at `address` (default: RAY_ADDRESS) or start a private local one.

    A local instance gets a free dashboard port, exported as RAY_API_SERVER_ADDRESS before Ray
    starts so that every process it spawns (Train's placement-group cleaner queries the State
    API without an address) finds this instance and not another one on the same host.
    """
    if ray.is_initialized():
        return
    address = ray_address(address)
    try:
        if address != LOCAL:
            ray.init(address=address, **kwargs)
            return
        (port,) = free_ports()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address=LOCAL, include_dashboard=True, dashboard_port=port, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BoatrayError(f"Ray could not start or join {address!r}: {first}") from None
