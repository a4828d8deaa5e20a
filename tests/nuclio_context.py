"""A real nuclio-sdk Context for the function's tests, whose log lines can be read back."""

from __future__ import annotations

import io
import logging
from typing import Any

import nuclio_sdk


class Ctx:
    """A real nuclio_sdk Context whose log lines are kept in ``text``."""

    def __init__(self, model: Any = None) -> None:
        self.stream = io.StringIO()
        logger = nuclio_sdk.Logger(logging.DEBUG, name=f"test-wbc-{id(self)}")
        logger.set_handler("test", self.stream, nuclio_sdk.logger.HumanReadableFormatter())
        self.context = nuclio_sdk.Context(logger=logger)
        if model is not None:
            self.context.user_data.model = model

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self, level: str) -> list[str]:
        """The logged lines of one level (``info``, ``warn``, ``error``...)."""
        return [line for line in self.text.splitlines() if f"[{level}]" in line]
