"""Error types shared by the library, the CLI and the API.

Every error a user can cause is a :class:`MrisegError` with an HTTP status,
so the API maps it to a problem-details response and the CLI prints its
message without a traceback. Anything else reaching the API is a bug (500).
"""

from __future__ import annotations

from typing import Sequence


class MrisegError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 400
    title: str = "Bad request"
    retryable: bool = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidVolumeError(MrisegError):
    """The input could be read but is not a usable 3D volume."""

    status = 422
    title = "Invalid volume"


class CorruptFileError(MrisegError):
    """The input file is truncated, has the wrong magic or cannot be decoded."""

    status = 422
    title = "Corrupt or unreadable file"


class UnsupportedFormatError(MrisegError):
    status = 415
    title = "Unsupported media type"


class VolumeTooLargeError(MrisegError):
    status = 413
    title = "Volume too large"


class UnknownStructureError(MrisegError):
    status = 400
    title = "Unknown structure"

    def __init__(self, unknown: Sequence[str], valid: Sequence[str], hint: str = ""):
        self.unknown = list(unknown)
        self.valid = list(valid)
        msg = f"unknown structure(s): {', '.join(self.unknown)}"
        if hint:
            msg += f" ({hint})"
        msg += f". Valid names: {', '.join(self.valid)}"
        super().__init__(msg)


class ModelUnavailableError(MrisegError):
    """A requested structure needs a sub-model whose weights are not installed."""

    status = 409
    title = "Model unavailable"


class ModelSourceUnreachableError(ModelUnavailableError):
    """The sub-model's source (an S3 bucket) cannot be read right now; retrying later may succeed."""

    status = 503
    title = "Model source unreachable"
    retryable = True


class ModelFolderError(MrisegError):
    """A model folder is present but does not match the catalogue or cannot load."""

    status = 500
    title = "Model folder invalid"


class StorageError(MrisegError):
    """Object storage refused or failed a request."""

    status = 502
    title = "Storage error"
    retryable = True


# -- errors the HTTP API raises itself (serving layer) ---------------------
class AuthenticationError(MrisegError):
    """No API key, or one that matches no site."""

    status = 401
    title = "Unauthorized"


class ForbiddenError(MrisegError):
    """The site's key is valid but the request names data outside its prefixes."""

    status = 403
    title = "Forbidden"


class NotFoundError(MrisegError):
    status = 404
    title = "Not found"


class ConflictError(MrisegError):
    """The resource exists but is in the wrong state for this request."""

    status = 409
    title = "Conflict"


class LengthRequiredError(MrisegError):
    """A chunked body where the size must be known before reading it."""

    status = 411
    title = "Length required"


class TooManyRequestsError(MrisegError):
    status = 429
    title = "Too many requests"
    retryable = True

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailableError(MrisegError):
    """A sub-model or dependency is down; retrying later may succeed."""

    status = 503
    title = "Service unavailable"
    retryable = True
