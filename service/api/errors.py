"""REST error translation: every error leaves as ``{"error": {code, message, hint}}`` with the HTTP status of the
one error table (``service.domain.errors``), whichever layer raised it (domain, compiler, FastAPI, Starlette).

Messages carry no framework wording (pydantic's "Value error, " prefix, bare JSON offsets), every position is
labelled (``mapping.tp_size``, ``query parameter limit``, ``JSON decode error at character 14``), and every body
has a non-empty hint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.compiler.errors import KilnError
from service.domain import error_body, status_for
from service.domain.errors import DEFAULT_HINTS, DomainError, InvalidSpec

from .schemas import ErrorOut

# the error responses every API route documents
ERROR_RESPONSES: dict[int | str, dict] = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 422)}
log = logging.getLogger("kiln.api")
FALLBACK_HINT = "see /docs for the API reference"
SCHEMA_HINT = "see /docs for the JobSpec schema"
PARAMETERS_HINT = "see /docs for this route's parameters"
JSON_HINT = "send the JobSpec as one JSON object (Content-Type: application/json)"
_PREFIX = re.compile(r"^(Value error|Assertion failed), ")
_SOURCES = {"query": "query parameter ", "header": "header ", "path": "path parameter ", "cookie": "cookie "}
_HTTP_CODES = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large"}


def location(loc: Sequence) -> str:
    """``("body", "mapping", "tp_size")`` -> ``mapping.tp_size``; ``("query", "limit")`` -> ``query parameter limit``;
    list indices as ``[i]``. ``loc`` of a bare model (gRPC) has no source: ``("labels", "a")`` -> ``labels.a``."""
    source, rest = (loc[0], loc[1:]) if loc and loc[0] in ("body", *_SOURCES) else ("body", loc)
    path = ""
    for part in rest:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return _SOURCES.get(source, "") + path if source != "body" else (path or "body")


def problem(error: Mapping[str, Any]) -> str:
    """One pydantic/FastAPI error as ``where: what``, without the framework's wording."""
    ctx = error.get("ctx") or {}
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":  # FastAPI puts the decoder's offset (a str index) in loc
        at = next((p for p in reversed(loc) if isinstance(p, int)), None)
        where = f" at character {at}" if at is not None else ""
        detail = f": {ctx['error']}" if ctx.get("error") else ""
        return f"body: JSON decode error{where}{detail}"
    if error.get("type") in ("value_error", "assertion_error") and ctx.get("error") is not None:
        message = str(ctx["error"])  # the validator's own message
    else:
        message = _PREFIX.sub("", str(error.get("msg", "")))
    return f"{location(loc)}: {message}"


def describe(errors: Iterable[Mapping[str, Any]], limit: int = 10) -> str:
    return "; ".join(problem(e) for e in list(errors)[:limit])


def _envelope(code: str, message: str, hint: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "hint": hint or FALLBACK_HINT}},
                        status_code=status, headers=headers)


def error_response(exc, headers: dict | None = None) -> JSONResponse:
    body = error_body(exc)
    status, _grpc = status_for(body["code"])
    return _envelope(body["code"], body["message"], body["hint"], status, headers)


async def _domain_error(_req: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _validation_error(_req: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    sources = {e.get("loc", ("body",))[0] for e in errors}
    if any(e.get("type") == "json_invalid" for e in errors):
        hint = JSON_HINT
    else:
        hint = SCHEMA_HINT if sources <= {"body"} else PARAMETERS_HINT
    return error_response(InvalidSpec(f"invalid request: {describe(errors)}", hint=hint))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this URL (Starlette's 405 names only the first route that matched the
    path: OPTIONS /v1/jobs would say ``Allow: POST`` although GET is served too)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(dict(request.scope))[0] != Match.NONE:
            methods |= route_methods
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> Response:  # unknown routes, wrong methods: same envelope
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405 and (methods := allowed_methods(request)):
        headers["Allow"] = ", ".join(methods)
    return _envelope(code, str(exc.detail), DEFAULT_HINTS.get(code, ""), exc.status_code, headers or None)


# The job store or the broker is away (PostgreSQL restarting, Redis down, a dropped connection): a 503 that says
# when to retry, never a 500. The pool drops the dead connections on the failure, so the next request after
# the backend is back reconnects by itself.
RETRY_AFTER_S = 2
BACKEND_DOWN_HINT = f"the job store or the broker is unreachable (restarting?); retry after {RETRY_AFTER_S} s"


def backend_down(exc: BaseException) -> bool:
    """An error that means "a backend is unreachable right now", not a bug: SQLAlchemy's OperationalError /
    InterfaceError (connection refused, closed, admin shutdown) or a DBAPI error on an invalidated connection,
    psycopg's OperationalError / InterfaceError (``pg_reads``: status polls read PostgreSQL directly), kombu's
    OperationalError (publish without a broker), redis-py's ConnectionError / TimeoutError."""
    import sqlalchemy.exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError)):
        return True
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg
        from kombu.exceptions import OperationalError as BrokerDown
        from redis.exceptions import ConnectionError as RedisDown
        from redis.exceptions import TimeoutError as RedisTimeout
    except ImportError:  # pragma: no cover - both ship with the service's dependencies
        return False
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):  # the poll path's own async reads
        return True
    return isinstance(exc, (BrokerDown, RedisDown, RedisTimeout))


class BackendUnavailable(DomainError):
    code = "unavailable"
    default_hint = BACKEND_DOWN_HINT


def unavailable_response() -> JSONResponse:
    return error_response(BackendUnavailable("service temporarily unavailable: the job store or broker is away"),
                          headers={"Retry-After": str(RETRY_AFTER_S)})


async def _backend_error(_req: Request, exc: Exception) -> Response:
    if backend_down(exc):
        log.warning("backend unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:200])
        return unavailable_response()
    log.error("internal error", exc_info=exc)
    return _envelope("internal", "internal error", "see the server log", 500)


async def _compiler_error(_req: Request, exc: Exception) -> Response:  # e.g. invalid_mapping from the preflight
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(KilnError, _compiler_error)
    import psycopg
    import sqlalchemy.exc as sa
    from kombu.exceptions import OperationalError as BrokerDown
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import TimeoutError as RedisTimeout

    for backend_error in (sa.DBAPIError, sa.DisconnectionError, psycopg.OperationalError, psycopg.InterfaceError,
                          BrokerDown, RedisDown, RedisTimeout):
        app.add_exception_handler(backend_error, _backend_error)
