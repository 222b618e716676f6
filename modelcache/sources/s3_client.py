"""The one way modelcache talks to S3: a boto3 client, or a lean signed client, and one error mapping.

Endpoint and credentials come from the AWS chain (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, IRSA), or only from the
keys given (a pod's secret; none given means anonymous). A custom endpoint
gets path-style addressing, as MinIO, SeaweedFS and most S3 servers want.

A pull reads a bucket through :class:`Bucket`. With a custom endpoint it is
:class:`LeanBucket`: listing pages, small GETs and presigned URLs are signed
by :mod:`.s3_sigv4` and sent with :mod:`http.client`, so neither boto3 nor
botocore's client (and its JSON service models) is loaded, which costs about
a second of start-up on a busy node. Keys come from the request, else from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (the chain's first link, as
botocore orders it), else from botocore's credential chain, imported only
then. AWS itself (no custom endpoint: regions, virtual hosts, redirects
between regions) goes through :class:`BotoBucket`, whose client is built once,
on first use, in a thread. Pushes (``package --to s3://``) use :func:`client`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import InvalidContent, ModelCacheError, NotFound, Unauthorized, Unavailable
from .credentials import SourceCredentials
from .http import connection_failure, error_for_status
from .proxy import check_request
from .s3_sigv4 import Keys, presign, query, url

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
        meta = e.response.get("ResponseMetadata", {})
        return error_for_code(str(e.response.get("Error", {}).get("Code", "")), int(meta.get("HTTPStatusCode") or 0),
                              what, retry_after=meta.get("HTTPHeaders", {}).get("retry-after"))
    return Unavailable(f"{what}: {connection_failure(e)}")


def error_for_code(code: str, status: int, what: str, *, retry_after: str | None = None) -> ModelCacheError:
    """An S3 error answer as one of ours: by its error code where that says it, else by its HTTP status."""
    if code in _DENIED:
        return Unauthorized(f"{what}: S3 refused our credentials ({code})")
    if code in _MISSING:
        return NotFound(f"{what}: {code}")
    return error_for_status(status, f"{what}: S3 error {code or status}", retry_after=retry_after)


Listed = dict[str, Any]  # one object of a listing: Key, Size, ETag (as boto3 gives them)


class Bucket(Protocol):
    """What a pull asks of a bucket. Every method blocks (run it in a thread) and raises our errors."""

    def pages(self, prefix: str) -> Iterator[list[Listed]]:
        """The objects under ``prefix``, a listing page at a time."""
        ...

    def first(self, prefix: str) -> Listed | None:
        """The first object under ``prefix`` (one listing request), or None."""
        ...

    def public(self, prefix: str, key: str) -> bool:
        """Whether anyone may list ``prefix`` and read ``key`` (two anonymous requests)."""
        ...

    def get(self, key: str, limit: int) -> bytes:
        """A small object whole, refused over ``limit`` bytes."""
        ...

    def url(self, key: str, expires: int) -> str:
        """A GET URL for ``key`` that holds its own authorization for ``expires`` seconds."""
        ...

    def head_part(self, key: str, number: int, etag: str) -> tuple[int, int] | None:
        """(size of part ``number``, count of parts) of an object uploaded in parts whose ETag is still
        ``etag``; None when the server cannot say."""
        ...

    def checksums(self, key: str, etag: str) -> dict[str, str]:
        """The checksums S3 keeps of the object whose ETag is still ``etag`` (a HEAD with
        ``x-amz-checksum-mode: ENABLED``), named as in its headers without ``x-amz-checksum-``:
        ``{"crc32": "<base64>-16", "type": "COMPOSITE"}``, say. Empty when it keeps none or cannot say."""
        ...


def open_bucket(bucket: str, *, what: str, connections: int, credentials: SourceCredentials | None,
                timeout: float) -> Bucket:
    """The lean client for a custom endpoint, boto3 for AWS itself."""
    custom = endpoint()
    if custom:
        return LeanBucket(custom, bucket, what=what, credentials=credentials, timeout=timeout)
    return BotoBucket(bucket, what=what, connections=connections, credentials=credentials)


class BotoBucket:
    """A bucket through boto3 (the client built once, on first use)."""

    def __init__(self, bucket: str, *, what: str, connections: int, credentials: SourceCredentials | None) -> None:
        self.bucket, self._what = bucket, what
        self._connections, self._credentials = connections, credentials
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def s3(self) -> Any:
        """The boto3 client."""
        with self._lock:
            if self._client is None:
                self._client = client(self._connections, self._credentials)
            return self._client

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as e:  # botocore raises many kinds; mapped here, once
            raise map_error(e, self._what) from e

    def pages(self, prefix: str) -> Iterator[list[Listed]]:
        pages = iter(self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                       PaginationConfig={"PageSize": PAGE_KEYS}))
        while True:
            try:
                page = next(pages, None)
            except Exception as e:
                raise map_error(e, self._what) from e
            if page is None:
                return
            yield page.get("Contents", [])

    def first(self, prefix: str) -> Listed | None:
        return next(iter(self._call(self.s3.list_objects_v2, Prefix=prefix, MaxKeys=1).get("Contents", [])), None)

    def public(self, prefix: str, key: str) -> bool:
        anonymous = client(unsigned=True)
        try:
            anonymous.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            anonymous.head_object(Bucket=self.bucket, Key=key)
        except Exception:  # refused, or anything else: not proven public, so private
            return False
        return True

    def get(self, key: str, limit: int) -> bytes:
        obj = self._call(self.s3.get_object, Key=key)
        if obj["ContentLength"] > limit:
            raise InvalidContent(f"{self._what}: {key} is over the {limit >> 20} MiB limit")
        return obj["Body"].read()

    def head_part(self, key: str, number: int, etag: str) -> tuple[int, int] | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key, PartNumber=number, IfMatch=f'"{etag}"')
            return int(head["ContentLength"]), int(head["PartsCount"])
        except Exception:  # not supported, refused, changed: the caller goes without
            return None

    def checksums(self, key: str, etag: str) -> dict[str, str]:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"', ChecksumMode="ENABLED")
        except Exception:  # not supported, refused, changed: the caller goes without
            return {}
        return {name[len("Checksum"):].lower(): str(value) for name, value in head.items()
                if name.startswith("Checksum") and value}

    def url(self, key: str, expires: int) -> str:
        try:
            return self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=expires)
        except Exception as e:
            raise map_error(e, self._what) from e


_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
PAGE_KEYS = 1000  # keys per listing page: S3's most (tests ask fewer, to see several pages)
_MAX_ANSWER = 16 << 20  # a listing page of 1000 keys is a few hundred KiB


def region() -> str:
    """The region to sign for: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's in the config file, us-east-1."""
    found = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if found:
        return found
    import configparser

    config = configparser.RawConfigParser()
    try:
        config.read(os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"))
    except configparser.Error:
        return "us-east-1"
    profile = os.environ.get("AWS_PROFILE") or "default"
    section = profile if profile == "default" else f"profile {profile}"
    return config.get(section, "region", fallback=None) or "us-east-1"


class LeanBucket:
    """A bucket at a custom endpoint, path-style, signed by :mod:`.s3_sigv4` (no botocore client)."""

    def __init__(self, endpoint: str, bucket: str, *, what: str, credentials: SourceCredentials | None,
                 timeout: float) -> None:
        self.endpoint, self.bucket, self._what, self._timeout = endpoint.rstrip("/"), bucket, what, timeout
        self._given = credentials
        self._anonymous = credentials is not None and not credentials.aws_access_key_id
        self._chain: Any = None  # botocore's credentials, when neither the request nor the environment has keys
        self._region = region()

    def _keys(self) -> Keys | None:
        if self._anonymous:
            return None
        given = self._given
        if given is not None and given.aws_access_key_id:
            return Keys(given.aws_access_key_id, given.aws_secret_access_key or "", given.aws_session_token)
        access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if access and secret:
            return Keys(access, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        if self._chain is None:
            import botocore.session

            self._chain = botocore.session.get_session().get_credentials()
            if self._chain is None:
                raise Unauthorized(f"{self._what}: no AWS credentials "
                                   "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        frozen = self._chain.get_frozen_credentials()  # refreshed here when temporary keys near their end
        return Keys(frozen.access_key, frozen.secret_key, frozen.token)

    def _url(self, method: str, path: str, params: str = "", *, anonymous: bool = False,
             expires: int = 900, headers: Mapping[str, str] | None = None) -> str:
        keys = None if anonymous else self._keys()
        if keys is None:
            return url(self.endpoint, path, params)
        return presign(method, self.endpoint, path, keys, region=self._region, query=params, expires=expires,
                       headers=headers)

    def _send(self, method: str, target: str, headers: Mapping[str, str] | None = None,
              ) -> tuple[int, bytes, Mapping[str, str]]:
        """One request (no redirects followed); (status, body, headers). Errors in the answer are the caller's.

        HTTPS_PROXY and friends apply (:mod:`.proxy`): an https endpoint through a CONNECT tunnel, an
        http one in absolute form, and a signed request to an http endpoint is refused, never shown
        to the proxy.
        """
        import http.client  # here: its imports (email's parser) cost start-up only when S3 is listed

        parts = urlsplit(target)
        sent = dict(headers or {})
        proxy = check_request(target, sent, what=self._what)
        secure = parts.scheme == "https"
        kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
        path = target[len(f"{parts.scheme}://{parts.netloc}"):]
        if proxy is None:
            conn = kind(parts.netloc, timeout=self._timeout)
        elif secure:
            conn = kind(proxy.host, proxy.port, timeout=self._timeout)
            conn.set_tunnel(parts.hostname or "", parts.port or 443, headers=proxy.headers())
        else:
            conn = kind(proxy.host, proxy.port, timeout=self._timeout)
            path = target  # absolute form, for the proxy to forward
            sent.update(proxy.headers())
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", parts.netloc)  # as signed, default port or not
            for name, value in sent.items():
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read(_MAX_ANSWER + 1) if method != "HEAD" else b""
            if len(body) > _MAX_ANSWER:
                raise InvalidContent(f"{self._what}: an answer of over {_MAX_ANSWER >> 20} MiB from S3")
            return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(f"{self._what}: {connection_failure(e)}") from e
        finally:
            conn.close()

    def _checked(self, method: str, target: str) -> bytes:
        from xml.etree import ElementTree

        status, body, _ = self._send(method, target)
        if status == 200:
            return body
        code = ""
        if body:
            try:
                code = ElementTree.fromstring(body).findtext("Code") or ""
            except ElementTree.ParseError:
                pass  # not S3's XML: the status says it
        raise error_for_code(code, status, self._what)

    def _list(self, prefix: str, *, token: str | None = None, limit: int | None = None,
              anonymous: bool = False) -> tuple[list[Listed], str | None]:
        from xml.etree import ElementTree

        params = {"list-type": "2", "prefix": prefix}
        if limit is not None:
            params["max-keys"] = str(limit)
        if token:
            params["continuation-token"] = token
        body = self._checked("GET", self._url("GET", f"/{self.bucket}", query(**params), anonymous=anonymous))
        try:
            root = ElementTree.fromstring(body)
            objects = [{"Key": c.findtext(f"{_NS}Key") or "", "Size": int(c.findtext(f"{_NS}Size") or 0),
                        "ETag": c.findtext(f"{_NS}ETag") or ""} for c in root.iter(f"{_NS}Contents")]
        except (ElementTree.ParseError, ValueError) as e:
            raise InvalidContent(f"{self._what}: the listing is not S3's XML: {e}") from e
        more = (root.findtext(f"{_NS}IsTruncated") or "").lower() == "true"
        return objects, root.findtext(f"{_NS}NextContinuationToken") if more else None

    def pages(self, prefix: str) -> Iterator[list[Listed]]:
        token: str | None = None
        while True:
            objects, token = self._list(prefix, token=token, limit=PAGE_KEYS)
            yield objects
            if not token:
                return

    def first(self, prefix: str) -> Listed | None:
        return next(iter(self._list(prefix, limit=1)[0]), None)

    def public(self, prefix: str, key: str) -> bool:
        try:
            self._list(prefix, limit=1, anonymous=True)
            status, _, _ = self._send("HEAD", self._url("HEAD", f"/{self.bucket}/{key}", anonymous=True))
        except ModelCacheError:  # refused, or anything else: not proven public, so private
            return False
        return status == 200

    def get(self, key: str, limit: int) -> bytes:
        body = self._checked("GET", self._url("GET", f"/{self.bucket}/{key}"))
        if len(body) > limit:
            raise InvalidContent(f"{self._what}: {key} is over the {limit >> 20} MiB limit")
        return body

    def url(self, key: str, expires: int) -> str:
        return self._url("GET", f"/{self.bucket}/{key}", expires=expires)

    def head_part(self, key: str, number: int, etag: str) -> tuple[int, int] | None:
        target = self._url("HEAD", f"/{self.bucket}/{key}", query(partNumber=str(number)))
        status, _, headers = self._send("HEAD", target, {"If-Match": f'"{etag}"'})
        try:
            return (int(headers["content-length"]), int(headers["x-amz-mp-parts-count"])) if status in (200, 206) \
                else None
        except (KeyError, ValueError):
            return None

    def checksums(self, key: str, etag: str) -> dict[str, str]:
        mode = {"x-amz-checksum-mode": "ENABLED"}  # S3 wants x-amz headers signed: so it is
        try:
            status, _, headers = self._send("HEAD", self._url("HEAD", f"/{self.bucket}/{key}", headers=mode),
                                            {**mode, "If-Match": f'"{etag}"'})
        except ModelCacheError:  # unreachable now: the caller goes without (the ranges will say)
            return {}
        prefix = "x-amz-checksum-"
        return {name[len(prefix):]: value for name, value in headers.items()
                if status == 200 and name.startswith(prefix) and name != "x-amz-checksum-mode"}
