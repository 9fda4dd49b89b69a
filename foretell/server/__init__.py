"""OpenAI-compatible HTTP server over AsyncEngine (needs the ``server`` extra: fastapi, uvicorn).

``create_app(engine, model_name)`` builds the FastAPI app for embedding in a larger ASGI setup;
``run_server(model, host, port, **engine_kwargs)`` is what ``foretell serve`` calls.
"""

from typing import Any

__all__ = ["create_app", "render_metrics", "run_server"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``foretell.server.limits`` (the CLI's options) imports without fastapi.
    if name in __all__:
        from foretell.server import app, metrics

        return getattr(metrics if name == "render_metrics" else app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
