"""DirectRoute (the route class of the hot status poll, GET /v1/jobs/{job_id}) and include_flat (routers onto the app)."""

from __future__ import annotations

import inspect

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.routing import Route


class JobIdConvertor(StringConvertor):
    """``{job_id:job_id}``: a path segment without ``:``. Job ids are UUIDs; the poll route ``/v1/jobs/{job_id}``
    must not also match ``/v1/jobs/<id>:cancel``, so that a GET there is a 405 (Allow: POST) as the schema says."""

    regex = "[^/:]+"


register_url_convertor("job_id", JobIdConvertor())


class DirectRoute(APIRoute):
    """An APIRoute (matched in order, documented in OpenAPI from its endpoint as usual) whose endpoint is
    called directly: ``endpoint(request=Request, **path_params) -> Response``. It skips FastAPI's
    per-request dependency resolution, validation and exit stacks, which cost more CPU than the rest of
    a status poll. So the endpoint may take only ``request: Request`` and ``str`` path parameters, and
    must return a Response; exceptions reach the app's exception handlers as from any route."""

    def __init__(self, path: str, endpoint, **kwargs):
        super().__init__(path, endpoint, **kwargs)
        try:
            params = inspect.signature(endpoint, eval_str=True).parameters
        except NameError:  # a name the endpoint's module cannot resolve: compare the annotations as written
            params = inspect.signature(endpoint).parameters
        path_names = set(self.param_convertors)
        for name, param in params.items():
            ok = (param.annotation in (Request, "Request") and name == "request") or \
                (name in path_names and param.annotation in (str, "str") and
                 isinstance(self.param_convertors[name], StringConvertor))
            if not ok:
                raise TypeError(f"DirectRoute {path}: parameter {name!r} must be `request: Request` or a str path parameter")
        if "request" not in params:
            raise TypeError(f"DirectRoute {path}: the endpoint must take `request: Request`")
        self.app = self._serve

    async def _serve(self, scope, receive, send):
        response = await self.endpoint(request=Request(scope, receive, send), **scope["path_params"])
        await response(scope, receive, send)

    async def handle(self, scope, receive, send):
        # Starlette's Route.handle (405 for another method, else self.app), not APIRoute's: an included
        # router would otherwise run the FastAPI request handler of its effective route context.
        await Route.handle(self, scope, receive, send)


def include_flat(app: FastAPI, router: APIRouter) -> None:
    """Declare ``router``'s routes on the app itself, as if written there (FastAPI's include_router before 0.16x).

    FastAPI 0.165's ``include_router`` keeps an included router as one lazy route that is matched twice per
    request, and runs an included APIRoute through the request handler of its effective route context, which
    would undo DirectRoute's fast path and add ~10 us of CPU per status poll. Flat routes are matched once,
    are listed in ``app.routes`` with their paths, and honour ``app.dependency_overrides``."""
    for r in router.routes:
        if not isinstance(r, APIRoute):
            raise TypeError(f"include_flat: {r!r} is not an APIRoute")
        app.router.add_api_route(
            r.path, r.endpoint, route_class_override=type(r), methods=r.methods, name=r.name,
            response_model=r.response_model, status_code=r.status_code, response_class=r.response_class,
            tags=r.tags, dependencies=r.dependencies, summary=r.summary, description=r.description,
            response_description=r.response_description, responses=r.responses, deprecated=r.deprecated,
            operation_id=r.operation_id, include_in_schema=r.include_in_schema, callbacks=r.callbacks,
            openapi_extra=r.openapi_extra, generate_unique_id_function=r.generate_unique_id_function,
            response_model_include=r.response_model_include, response_model_exclude=r.response_model_exclude,
            response_model_by_alias=r.response_model_by_alias,
            response_model_exclude_unset=r.response_model_exclude_unset,
            response_model_exclude_defaults=r.response_model_exclude_defaults,
            response_model_exclude_none=r.response_model_exclude_none,
            strict_content_type=r.strict_content_type, max_body_size=r.max_body_size)
