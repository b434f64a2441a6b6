"""build_app(settings) -> FastAPI: routes, error handlers, and a lifespan that starts/stops the engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mygpt import __version__
from mygpt.api.admin import router as admin_router
from mygpt.api.batches import router as batches_router
from mygpt.api.batches import runner as batch_runner
from mygpt.api.errors import document_errors, install_error_handlers
from mygpt.api.finetune import router as finetune_router
from mygpt.api.request_ids import RequestIds
from mygpt.api.responses import router as responses_router
from mygpt.api.routes import router
from mygpt.config import Settings
from mygpt.cost import CLOSED_API_PRICES, CLOSED_EMBEDDING_PRICES, CostModel, load_price_table
from mygpt.metrics import Metrics
from mygpt.state import ServerState
from mygpt.tenancy.config import Tenancy, load_tenancy_from
from mygpt.tenancy.tenants import Tenants


def build_app(
    settings: Settings, state: ServerState | None = None, tenancy: Tenancy | None = None
) -> FastAPI:
    """The ASGI app. `state` lets tests supply a pre-built (e.g. fake) engine; by default the model
    loads in the background after start-up so that /live answers while /ready is still 503.
    `tenancy` comes from cli.py (which reads the config file and the environment); default: the
    settings alone (a single tenant)."""
    if state is None:
        tenancy = tenancy or load_tenancy_from(settings)
        prices, embedding = (
            load_price_table(settings.price_table)
            if settings.price_table
            else (CLOSED_API_PRICES, CLOSED_EMBEDDING_PRICES)
        )
        cost = CostModel(settings.cost_per_hour_usd, dict(prices), dict(embedding))
        metrics = Metrics(cost, settings.metrics_max_adapters)
        state = ServerState(settings, Tenants(tenancy, metrics), metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.chat is None:
            state.start()
        if settings.finetune:  # batches a restart interrupted resume once the model is loaded
            batch_runner(state)
        yield
        if state.batches is not None:
            await state.batches.stop()  # running requests run again when the batch resumes
        state.stop()

    app = FastAPI(title="mygpt", version=__version__, lifespan=lifespan)
    app.state.mygpt = state
    app.add_middleware(RequestIds)
    if origins := [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]:
        # browsers' preflights and the headers their pages may read; keys go in Authorization, which
        # a page sets itself: no cookies, so no credentials mode
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "x-request-id",
                "retry-after",
                *(
                    f"x-ratelimit-{w}-{k}"
                    for w in ("limit", "remaining", "reset")
                    for k in ("requests", "tokens")
                ),
            ],
            max_age=600,
        )
    install_error_handlers(app)
    document_errors(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(finetune_router)
    app.include_router(responses_router)
    app.include_router(batches_router)
    return app
