"""OpenAI's error shape for every non-2xx answer, and the handlers that produce it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mygpt.api.protocol import ErrorInfo, ErrorResponse
from mygpt.api.request_ids import REQUEST_ID

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # a message may quote the request, lone UTF-16 surrogates included: JSON bodies are UTF-8
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(
            message=message, type=type or _TYPES.get(status, "server_error"), param=param, code=code
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), self.status, headers=self.headers)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def adapter_changing(exc: Exception) -> APIError:
    """An adapter whose files were being replaced as they were read: a 503 that clients retry."""
    return APIError(503, str(exc), param="model", code="adapter_changing", headers={"Retry-After": "1"})


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or you do not have access to it.", param="model",
        code="model_not_found",
    )  # fmt: skip


def invalid_value(errors: list[dict], rename: Callable[[str], str] = str) -> APIError:
    """The 400 of a request that failed validation (pydantic's errors()): its first error, naming the
    parameter (`rename` maps it to the caller's name for it, where the request was converted)."""
    err = errors[0] if errors else {"msg": "invalid value", "loc": ()}
    param = _param_of(tuple(err.get("loc", ())))
    msg = err.get("msg", "invalid value")
    if param is None:
        return invalid(f"Invalid request: {msg}", code="invalid_value")
    param = rename(param)
    return invalid(f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # drop pydantic's union-branch names ("str", "list[...]") from the location
    parts = [p for p in parts if not (p.startswith(("list[", "dict[")) or p in ("str", "int", "float"))]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """C1: every error, ours, validation, routing or unexpected, leaves in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if err.get("type") == "json_invalid":
            return invalid("We could not parse the JSON body of your request: " + err["msg"]).response()
        if tuple(err.get("loc", ())) == ("body",):
            return invalid(
                "The request body must be a JSON object (Content-Type: application/json)."
            ).response()
        return invalid_value(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        rid = REQUEST_ID.get()  # answered outside the request id middleware (Starlette's last resort)
        return APIError(
            500, "The server had an error while processing your request.", type="server_error",
            headers={"x-request-id": rid} if rid else None,
        ).response()  # fmt: skip


def document_errors(app: FastAPI) -> None:
    """The OpenAPI document as the server answers: FastAPI's generated 422 (HTTPValidationError) is
    never sent (validation errors are 400s in OpenAI's shape, C1), and any operation can answer an
    error in OpenAI's shape (401, 403, 404, 413, 429, 503...)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error.pop("$defs", {}))
            schemas["ErrorResponse"] = error
            ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
            for operations in spec["paths"].values():
                for op in operations.values():
                    responses = op.setdefault("responses", {})
                    if responses.pop("422", None) is not None or "requestBody" in op:
                        responses["400"] = {"description": "Invalid request", "content": ref}
                    responses["default"] = {"description": "An error in OpenAI's shape", "content": ref}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
