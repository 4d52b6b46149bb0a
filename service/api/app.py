"""The REST API: a thin FastAPI adapter over JobService. Run it with ``kiln serve``.

``create_app`` only wires the parts together: the routers (``routes/``: jobs, artifacts, ops, docs), the middleware
(``middleware.py``), the error translation (``errors.py``: every error leaves as ``{"error": {code, message,
hint}}``) and the state the dependencies read (``dependencies.py``: key ring, metrics, settings, runtime).
"""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from service.settings import Settings, get_settings

from .auth import KeyRing
from .errors import install_error_handlers
from .middleware import BodySizeLimit, Metrics, ObserveRequests
from .routes import artifacts, docs, jobs, ops
from .routing import DirectRoute, include_flat

__all__ = ["DirectRoute", "create_app"]

DASHBOARD = Path(__file__).with_name("dashboard")


def create_app(settings: Settings | None = None, *, runtime=None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = runtime is None
        if own:
            from .wiring import build_runtime

            app.state.runtime = await asyncio.to_thread(build_runtime, settings)
        else:
            app.state.runtime = runtime
        yield
        if own:
            app.state.runtime.close()

    # /docs and /redoc are routes/docs.py's: FastAPI's own would load Swagger UI and ReDoc from a CDN
    app = FastAPI(title="Kiln", version="1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Compile Hugging Face models into TensorRT-LLM checkpoints and engines.")
    app.state.settings = settings
    app.state.keys = KeyRing(settings.api_key_hashes())
    app.state.metrics = Metrics()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.request_body_timeout_s)
    app.add_middleware(ObserveRequests, metrics=app.state.metrics)
    install_error_handlers(app)

    for module in (jobs, artifacts, ops, docs):
        include_flat(app, module.router)
    docs.mount_assets(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    if DASHBOARD.is_dir():
        app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")

    return app
