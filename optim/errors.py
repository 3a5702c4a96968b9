"""Every error the library raises for a request it cannot serve as asked.

Each error has a `kind` (what went wrong, in words a client can act on) and a `code` (a stable
machine-readable name, OpenAI's `error.code`). The library never speaks of HTTP statuses: the
web shell maps kinds to statuses in one table (app/errors.py), and another shell (a CLI, a Ray
deployment) may map them its own way.
"""

from __future__ import annotations

from enum import Enum


class Kind(Enum):
    INVALID = "invalid"  # the request's fields or content are wrong: fix them and resend
    NOT_FOUND = "not_found"  # it names something that does not exist
    UNAUTHORIZED = "unauthorized"  # no valid credentials (an API key) came with it
    TOO_LARGE = "too_large"  # over a configured size or duration limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # the upload is not a media format we decode
    OVERLOADED = "overloaded"  # the server is at capacity: retry after `retry_after` seconds
    NOT_READY = "not_ready"  # what it names is still loading (or failed to), or the server is shutting down: retry later
    RATE_LIMITED = "rate_limited"  # too many requests of a costly kind: retry after `retry_after` seconds
    TIMEOUT = "timeout"  # the client was too slow to send its request
    CLIENT_CLOSED = "client_closed"  # the client left before its answer (nobody reads the response)


class ServiceError(Exception):
    """A request the service cannot serve as asked. `param` names the request field at fault."""

    kind = Kind.INVALID
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds, for OVERLOADED / NOT_READY


class InvalidRequest(ServiceError):
    code = "invalid_value"


class PromptTooLong(ServiceError):
    code = "prompt_too_long"

    def __init__(self, length: int, limit: int):
        super().__init__(f"the prompt has {length} characters; the limit is {limit} (only its last 223 tokens are used)", "prompt")


# ---------------------------------------------------------------- models and variants
class UnknownModel(ServiceError):
    kind = Kind.NOT_FOUND
    code = "model_not_found"


class ModelNotReady(ServiceError):
    kind = Kind.NOT_READY
    code = "model_not_ready"


class UnknownVariant(ServiceError):
    """Not a valid variant name, or a valid one this server does not serve."""

    code = "unknown_variant"


class VariantUnavailable(ServiceError):
    """A served variant that cannot run yet (a distilled student that was never built)."""

    code = "variant_unavailable"


class VariantNotOnDemand(ServiceError):
    """A served variant that is neither built nor allowed to be built by a request."""

    code = "variant_not_on_demand"


class VariantBuildsLimited(ServiceError):
    kind = Kind.RATE_LIMITED
    code = "variant_build_rate_limited"

    def __init__(self, model: str, limit: int, retry_after: int):
        super().__init__(
            f"model {model!r} has built {limit} variants in the last minute (VARIANT_BUILDS_PER_MINUTE); "
            f"retry in {retry_after} s or use a variant already built",
            "model",
            max(1, retry_after),
        )


class UnsupportedOption(ServiceError):
    """An option the model cannot honour (translation or another language on an English-only model)."""

    code = "unsupported_option"


# ---------------------------------------------------------------- capacity
class QueueFull(ServiceError):
    kind = Kind.OVERLOADED
    code = "server_overloaded"

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at its queue limit; retry in {retry_after} s", None, retry_after)


# ---------------------------------------------------------------- audio
class AudioError(ServiceError):
    """Audio the service cannot use; the fault is the uploaded file's."""

    code = "invalid_audio"

    def __init__(self, message: str, param: str | None = "file"):
        super().__init__(message, param)


class EmptyAudio(AudioError):
    code = "empty_file"


class UnsupportedAudio(AudioError):
    """Not recognised as audio at all (a text file, random bytes, an image, ...)."""

    kind = Kind.UNSUPPORTED_MEDIA
    code = "unsupported_audio_format"


class CorruptAudio(AudioError):
    """Recognised as an audio format, but decoding failed (truncated or damaged)."""


class NonFiniteAudio(CorruptAudio):
    """Float samples that are NaN or infinite: no recording has them, and they would poison the features."""


class AudioOutOfRange(AudioError):
    """Well-formed audio outside what the service decodes: a sample rate or channel count no recording has."""


class AudioTooLong(AudioError):
    kind = Kind.TOO_LARGE
    code = "audio_too_long"
