"""moto's S3 server in this process (HTTP on a free port): the S3 API the registry tests and the
registry benchmark run against (`pip install moto[server]`, in the test extra).

moto checks a conditional PutObject (If-None-Match / If-Match) and then stores the object in two
steps while serving each request on its own thread; real S3 applies the condition atomically.
`start_endpoint` makes moto's PutObject handler one critical section so the store gives the
guarantee S3 documents, and races exercise our code, not moto's thread interleaving.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoEndpoint:
    """One ThreadedMotoServer; `stop()`/`start()` make an outage on the same port (the stored
    objects live in this process's moto backends and survive it)."""

    port: int
    server: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _atomic_conditional_puts() -> None:
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_atomic", False):
        return
    lock, put_object = threading.Lock(), S3Response.put_object

    def atomic_put_object(self):
        with lock:
            return put_object(self)

    atomic_put_object._atomic = True
    S3Response.put_object = atomic_put_object


def start_endpoint() -> MotoEndpoint:
    """A started moto S3 server on a free port of 127.0.0.1."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    _atomic_conditional_puts()
    endpoint = MotoEndpoint(free_port())
    endpoint.start()
    return endpoint
