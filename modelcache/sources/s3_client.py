"""The one way modelcache makes a boto3 S3 client, and maps what botocore raises to our errors.

Endpoint and credentials come from the AWS chain (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, IRSA), or only from the
keys given (a pod's secret; none given means anonymous). A custom endpoint
gets path-style addressing, as MinIO, SeaweedFS and most S3 servers want.
boto3 is imported here, when a client is made, never at module import
(it costs a quarter of a second before anything moves).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ModelCacheError, NotFound, Unauthorized, Unavailable
from .credentials import SourceCredentials
from .http import connection_failure, error_for_status

_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403")
_MISSING = ("NoSuchBucket", "NoSuchKey", "NotFound", "404")


def endpoint() -> str | None:
    """The custom S3 endpoint the AWS chain names, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client(connections: int = 16, credentials: SourceCredentials | None = None, *, unsigned: bool = False) -> Any:
    """A boto3 S3 client with a pool of ``connections`` (at least 10).

    Credentials: the standard chain when ``credentials`` is None, else only its
    keys; ``unsigned`` (or ``credentials`` without keys) sends anonymous requests.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    keys: dict[str, str | None] = {}
    if credentials is not None and credentials.aws_access_key_id:
        keys = {"aws_access_key_id": credentials.aws_access_key_id,
                "aws_secret_access_key": credentials.aws_secret_access_key,
                "aws_session_token": credentials.aws_session_token}
    elif credentials is not None:
        unsigned = True
    extra = {"signature_version": UNSIGNED} if unsigned else {}
    config = Config(s3={"addressing_style": "path"} if endpoint() else {}, retries={"mode": "standard"},
                    max_pool_connections=max(10, connections), **extra)
    return boto3.client("s3", config=config, **keys)


def map_error(e: BaseException, what: str) -> ModelCacheError:
    """A botocore error as one of ours: by S3's error code where it names one, else by HTTP status."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, ModelCacheError):
        return e
    if isinstance(e, NoCredentialsError):
        return Unauthorized(f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _DENIED:
            return Unauthorized(f"{what}: S3 refused our credentials ({code})")
        if code in _MISSING:
            return NotFound(f"{what}: {code}")
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        retry_after = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("retry-after")
        return error_for_status(status, f"{what}: S3 error {code}", retry_after=retry_after)
    return Unavailable(f"{what}: {connection_failure(e)}")
