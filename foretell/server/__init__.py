"""OpenAI-compatible HTTP server over AsyncEngine (needs the ``server`` extra: fastapi, uvicorn).

``create_app(engine, model_name)`` builds the FastAPI app for embedding in a larger ASGI setup;
``run_server(model, host, port, **engine_kwargs)`` is what ``foretell serve`` calls.
"""

from foretell.server.app import create_app, render_metrics, run_server

__all__ = ["create_app", "render_metrics", "run_server"]
