"""REST error translation: every error leaves as ``{"error": {code, message, hint}}`` with the HTTP status of the
one error table (``service.domain.errors``), whichever layer raised it (domain, compiler, FastAPI, Starlette).

Messages carry no framework wording (pydantic's "Value error, " prefix, bare JSON offsets), every position is
labelled (``mapping.tp_size``, ``query parameter limit``, ``JSON decode error at character 14``), and every body
has a non-empty hint.
"""

from __future__ import annotations

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


async def _compiler_error(_req: Request, exc: Exception) -> Response:  # e.g. invalid_mapping from the preflight
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(KilnError, _compiler_error)
