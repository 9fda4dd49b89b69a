"""The engine: offline ``generate``, and ``add_request`` / ``step`` / ``abort`` for embedding."""

from foretell.engine.async_engine import AsyncEngine
from foretell.engine.engine import Engine
from foretell.engine.outputs import RequestOutput

__all__ = ["AsyncEngine", "Engine", "RequestOutput"]
