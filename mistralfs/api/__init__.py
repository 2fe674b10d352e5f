"""Async client for Mistral AI's Files API (httpx under trio): models, errors, retries."""

from mistralfs import DEFAULT_SERVER_URL
from mistralfs.api.client import FilesClient
from mistralfs.api.errors import (
    ApiError,
    AuthError,
    CertificateRejected,
    NotFound,
    ProtocolError,
    RateLimited,
    Rejected,
    ServerError,
    TooLarge,
    Unavailable,
    UploadMismatch,
    UrlExpired,
)
from mistralfs.api.models import BatchJob, FilePage, RemoteFile, SignedUrl
from mistralfs.api.retry import RetryPolicy
from mistralfs.api.upload_body import GrowingFile, StreamAbandoned
from mistralfs.api.uploads import GrowingUpload

__all__ = [
    "DEFAULT_SERVER_URL",
    "ApiError",
    "AuthError",
    "BatchJob",
    "CertificateRejected",
    "FilePage",
    "FilesClient",
    "GrowingFile",
    "GrowingUpload",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "Rejected",
    "RemoteFile",
    "RetryPolicy",
    "ServerError",
    "SignedUrl",
    "StreamAbandoned",
    "TooLarge",
    "Unavailable",
    "UploadMismatch",
    "UrlExpired",
]
