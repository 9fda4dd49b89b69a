"""The error every refusal is answered with, in OpenAI's shape (no third-party imports, so that
``limits`` and the CLI can use it without the server extra)."""

from __future__ import annotations

import re
from typing import Any

FIELD_RE = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\])?(?:\.[\w]+)*): ")


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def from_value_error(cls, err: ValueError, rename: dict[str, str] | None = None) -> APIError:
        """Turn foretell's ``"field: why"`` errors into a 400 that names the API field."""
        message = str(err)
        match = FIELD_RE.match(message)
        param = match.group(1) if match else None
        if param is not None and rename and param in rename:
            param = rename[param]
            message = f"{param}: {message[match.end() :]}"
        return cls(message, param=param)
