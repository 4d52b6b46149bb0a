"""REST error translation: every error leaves as ``{"error": {code, message, hint}}`` with the HTTP status of the
one error table (``service.domain.errors``), whichever layer raised it (domain, compiler, FastAPI, Starlette)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.compiler.errors import KilnError
from service.domain import error_body, status_for
from service.domain.errors import DomainError, InvalidSpec

from .schemas import ErrorOut

# the error responses every API route documents
ERROR_RESPONSES: dict[int | str, dict] = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 422)}


def error_response(exc, headers: dict | None = None) -> JSONResponse:
    body = error_body(exc)
    status, _grpc = status_for(body["code"])
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _domain_error(_req, exc: DomainError):
    return error_response(exc)


async def _validation_error(_req, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()[:10])
    return error_response(InvalidSpec(f"invalid request: {problems}", hint="see /docs for the JobSpec schema"))


async def _http_error(_req, exc: StarletteHTTPException):  # unknown routes, wrong methods: same envelope
    code = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 413: "payload_too_large"}.get(
        exc.status_code, f"http_{exc.status_code}")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail), "hint": ""}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _compiler_error(_req, exc: KilnError):  # e.g. invalid_mapping from the submit-time preflight
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(KilnError, _compiler_error)
