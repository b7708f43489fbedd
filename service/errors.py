"""What the service refuses, and how: RequestError (HTTP status, metric reason, message) for every refusal.

Every client mistake becomes a RequestError: an HTTP status, a reason (one of service.metrics.REASONS)
and a message that says what to send instead. `rejection` maps the other exceptions a request can
raise (a bad image, a full queue or budget, a diverged inference) to theirs; anything else is a bug, which
`refusal` turns into a 500 with reason `internal` (its traceback logged, never sent) so that a client still
gets a JSON answer and the metric still counts it.
"""

from __future__ import annotations

import logging

from pcmodel import ImageError

from .batching import Overloaded
from .budget import NeverFits, OverBudget

logger = logging.getLogger(__name__)

# An unusable image is the client's mistake: too many pixels is 413, a format the service does not read 415.
IMAGE_STATUS = {"bad_image": 400, "too_small": 400, "too_large": 413, "unsupported_format": 415}


class RequestError(Exception):
    """A request (or one image of a batch) the service refuses: HTTP status, metric reason, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class NotFinite(RuntimeError):
    """Inference produced NaN or Inf: the checkpoint is unstable for this input (not the client's fault)."""


def rejection(exc: BaseException) -> RequestError | None:
    """The RequestError for an exception a request can raise, or None for a bug (a real 500)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ImageError):
        return RequestError(IMAGE_STATUS.get(exc.reason, 400), exc.reason, str(exc))
    if isinstance(exc, Overloaded):
        return RequestError(503, "overloaded", str(exc))
    if isinstance(exc, OverBudget):
        return RequestError(503, "over_budget", str(exc))
    if isinstance(exc, NeverFits):
        return RequestError(413, "too_large", str(exc))
    if isinstance(exc, NotFinite):
        return RequestError(500, "not_finite", str(exc))
    return None


def refusal(exc: BaseException) -> RequestError:
    """rejection(exc), or for a bug a 500 `internal`: the traceback goes to the log, a plain message to the client."""
    error = rejection(exc)
    if error is None:
        logger.error("a request failed on an unexpected error (a bug)", exc_info=exc)
        error = RequestError(
            500, "internal", "the service failed on this request (an internal error, logged on the server)"
        )
    return error
