"""Errors over HTTP in OpenAI's JSON shape, shared by the OpenAI routes and the admin routes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every 4xx of this server."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route returns."""
    text = {400: "Invalid request", 401: "Missing or wrong API key (when the server has one)",
            404: "Unknown model or resource", 409: "Not available on this server", 422: "Does not fit the model"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def install_error_handlers(app: FastAPI) -> None:
    """APIError and request validation errors answer with OpenAI's error shape and a 4xx."""

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON")
        loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{loc}: {msg}" if loc else msg, param=loc or None)
