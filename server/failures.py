"""What can go wrong below the HTTP edge, named without HTTP.

The pipeline, the engines and the reloader raise these; the edge maps each class to a status and
an OpenAI error code in one table (`server.api.errors.FAILURES`). A class says what happened, not
how to answer it.
"""

from __future__ import annotations


class Failure(Exception):
    """Base of every domain failure. `field` names the request field at fault, when one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


class InvalidInput(Failure):
    """A request the served models cannot take as it is (an empty prompt, best_of over the limit...)."""


class ContextTooLong(InvalidInput):
    """The prompt, or prompt plus max_tokens, does not fit the model's context."""


class Overloaded(Failure):
    """An engine's queue is at its bound; retrying later can succeed."""


class NotReady(Failure):
    """The models are still loading or warming up; retrying later can succeed."""


class EngineStopped(Failure):
    """The engine was shut down (the server is stopping) before the work ran."""


class EngineDead(Failure):
    """The engine failed and cannot serve any request until it is replaced; the message says why."""


class LogBehind(Failure):
    """The candidate log's writer is too far behind to take a request's candidates in time; the
    request fails rather than being acknowledged with candidates that might not be kept."""


class SampleLogUnusable(Failure):
    """The candidate log's path holds something that is not a candidate log (or cannot be opened)."""


class NonFiniteReward(Failure):
    """The reward model returned NaN or an infinity: the request fails rather than being ranked
    (or logged) on a value that means nothing."""


class RuleFailed(Failure):
    """A reward function raised, returned something other than a finite number, or ran out of
    time: its request fails, naming the member; the server goes on."""


class CheckpointError(Failure, ValueError):
    """A model directory that cannot be served as asked; the message says what to change."""


class ReloadRefused(Failure):
    """A reload's checkpoint could not be loaded or run; nothing was swapped."""
