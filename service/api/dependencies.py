"""What a route may ask for: the JobService, the caller's tenant, the request metrics, the settings.

Everything hangs off ``app.state`` (set by ``create_app``), so a router module can be mounted on any app
that provides it, and a test can build one with its own state. The dependencies are async: a trivial
dependency must not cost a threadpool hop on the polling path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.domain import JobService
from service.settings import Settings

from .auth import KeyRing, key_from_headers
from .middleware import Metrics


def keys_of(request: Request) -> KeyRing:
    return request.app.state.keys


def tenant_of(request: Request) -> str:
    """The caller's tenant from its ``Authorization: Bearer`` or ``X-API-Key`` header (401 when keyed and absent
    or wrong). For routes that read headers themselves (``DirectRoute``)."""
    headers = request.headers
    return request.app.state.keys.tenant_for(key_from_headers(headers.get("authorization"), headers.get("x-api-key")))


async def service_dep(request: Request) -> JobService:
    return request.app.state.runtime.service


async def tenant_dep(request: Request, authorization: Annotated[str | None, Header()] = None,
                     x_api_key: Annotated[str | None, Header()] = None) -> str:
    return keys_of(request).tenant_for(key_from_headers(authorization, x_api_key))


async def metrics_dep(request: Request) -> Metrics:
    return request.app.state.metrics


async def settings_dep(request: Request) -> Settings:
    return request.app.state.settings


Service = Annotated[JobService, Depends(service_dep)]
Tenant = Annotated[str, Depends(tenant_dep)]
RequestMetrics = Annotated[Metrics, Depends(metrics_dep)]
AppSettings = Annotated[Settings, Depends(settings_dep)]
