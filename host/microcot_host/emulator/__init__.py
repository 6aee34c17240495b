"""The platform emulator: a Cloud of Things on one machine (issue 3).

Mosquitto with TLS and seed 002's access control (broker.py), the platform model and its REST API
(model.py, api.py; over HTTP: webapp.py on Starlette, served by uvicorn in http.py), the SmartREST
engine (engine*.py) and the MQTT connector that serves devices with it (connector.py,
bootstrap.py), put together by `Emulator` (service.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Emulator"]

if TYPE_CHECKING:
    from .service import Emulator


def __getattr__(name: str) -> Any:
    # lazily: importing the package (the broker tests, the CLI) should not pull in everything
    if name == "Emulator":
        from .service import Emulator
        return Emulator
    raise AttributeError(name)
