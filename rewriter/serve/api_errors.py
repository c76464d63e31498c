"""OpenAI's error body for every error the server answers, and the FastAPI handlers that produce it.

A bad field, bad JSON, an unknown model or a prompt over the context is a 400 naming the field; a
missing or wrong key is a 401; a full queue is a 503. An error inside a stream is one chunk of the
same body.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hfrewrite.errors import RequestError
from hfrewrite.serve import protocol as p


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> p.ErrorResponse:
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)

    def chunk(self) -> str:
        """The error as one server-sent event's data."""
        return self.body().model_dump_json()


def engine_failure(error: BaseException) -> ApiError:
    """What a request that failed while running answers: 400 for our request errors, 500 otherwise."""
    if isinstance(error, RequestError):
        return ApiError(400, str(error), None)
    return ApiError(500, f"the request failed in the engine: {type(error).__name__}: {error}", None, "server_error")


def install_handlers(app: FastAPI) -> None:
    """Answer ApiError, pydantic validation errors and Starlette's HTTP errors (404, 405) with OpenAI's body."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", "body").response()
        field = ".".join(location) or "body"
        return ApiError(400, f"{field}: {first.get('msg')} (got {first.get('input')!r})"[:500], field).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return ApiError(error.status_code, str(error.detail), None, kind).response()
