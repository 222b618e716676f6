"""The Hugging Face Hub as a source: ``hf://ORG/NAME[@REVISION]``.

The revision (a branch, tag or commit; ``main`` by default) is resolved to a
commit once, and the file list comes from the Hub API through
``huggingface_hub`` (``repo_info`` and a recursive ``list_repo_tree``, the
calls ``snapshot_download`` makes), honouring ``HF_ENDPOINT`` and
``HF_TOKEN`` as it does (or only the token given with the request: a pod's
secret). A model read with a token counts as private unless the Hub says the
repository is neither private nor gated. LFS files come with their sha256, so they are
verified and deduplicated against every other source before a byte moves;
small non-LFS files are learnt on the way in like S3 objects, and checked
against the git blob id the Hub lists for them.

Bytes come from ``{endpoint}/{repo}/resolve/{commit}/{path}`` by parallel
ranges on the lean HTTP reader. The token goes to the Hub only: a redirect
to another host (the CDN holding LFS objects) is followed without it, and
the redirect target is reused for the file's other ranges until it refuses
(signed CDN links expire), when the file is resolved again.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

from ..errors import ModelCacheError, NotFound, Unauthorized, Unavailable
from ..model import Blob, FileEntry, Model, standin_digest
from ..refs import HfRef
from ..tree import safe_path
from .base import SourceOptions
from .http import (
    connection_failure,
    error_for_status,
    follow_redirects,
    same_origin,
)
from .proxy import refuse_plain
from .rawget import RawPool, RawResponse

DEFAULT_ENDPOINT = "https://huggingface.co"
_GIT_OID = re.compile(r"[0-9a-f]{40}")


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _with_token(url: str, headers: dict[str, str], token: str | None) -> dict[str, str]:
    """``headers``, plus the token when ``url`` is on the Hub's own origin (never a CDN's)."""
    if token and same_origin(url, _endpoint()):
        return {**headers, "Authorization": f"Bearer {token}"}
    return headers


def map_hub_error(e: Exception, repo: str, revision: str | None = None) -> ModelCacheError:
    """A huggingface_hub error as one of ours, naming the repository (and the revision asked for)."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return Unauthorized(f"hf://{repo} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(e, errors.RevisionNotFoundError):
        named = f" {revision!r}" if revision else ""
        return NotFound(f"hf://{repo}: revision{named} not found (a branch, tag or commit of the repository)")
    if isinstance(e, errors.RepositoryNotFoundError):
        hint = "" if _token() else " (if it is private or gated, set HF_TOKEN)"
        return NotFound(f"hf://{repo}: repository not found{hint}")
    if isinstance(e, errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else 0
        retry_after = e.response.headers.get("Retry-After") if e.response is not None else None
        return error_for_status(status, f"hf://{repo}: the Hub answered", retry_after=retry_after,
                                hint="check HF_TOKEN")
    return Unavailable(f"hf://{repo}: cannot reach the Hub at {_endpoint()}: {connection_failure(e)}")


class HfSource:
    """Resolves and reads one ``hf://`` reference."""

    def __init__(self, ref: HfRef, options: SourceOptions, *,
                 learned: Callable[[str], str | None] | None = None) -> None:
        self.ref = ref
        self.name = str(ref)
        self._learned = learned or (lambda key: None)
        self._raw = RawPool(connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                            threads=options.connections)
        self._paths: dict[str, str] = {}       # blob digest -> path in the repo
        self._located: dict[str, str] = {}     # path -> URL after redirects (the CDN's)
        self._commit = ""
        given = options.credentials
        self._token = _token() if given is None else given.hf_token  # a pod's secret: its token only
        # For huggingface_hub: False never lets it find a token by itself (its login cache) for a pod.
        self._api_token: str | bool | None = self._token or (None if given is None else False)
        self.needed_credentials = False  # set by resolve

    def _list(self) -> tuple[str, list]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        # huggingface_hub takes HTTP(S)_PROXY by itself: never let it send our token to an http:// Hub through one.
        refuse_plain(_endpoint(), what=self.name, credentials=bool(self._token))
        api = HfApi(endpoint=_endpoint(), token=self._api_token)
        try:
            info = api.repo_info(self.ref.repo, revision=self.ref.revision)
            assert info.sha
            # Conservative: with a token, public only when the Hub says so in as many words.
            self.needed_credentials = bool(self._token) and not (info.private is False and info.gated is False)
            files = [f for f in api.list_repo_tree(self.ref.repo, revision=info.sha, recursive=True)
                     if isinstance(f, RepoFile)]
        except Exception as e:  # huggingface_hub raises its own tree of errors and httpx's
            raise map_hub_error(e, self.ref.repo, self.ref.revision) from e
        return info.sha, files

    def _revision(self) -> None:
        from huggingface_hub import HfApi

        refuse_plain(_endpoint(), what=self.name, credentials=bool(self._token))
        try:
            HfApi(endpoint=_endpoint(), token=self._api_token).repo_info(self.ref.repo,
                                                                             revision=self.ref.revision)
        except Exception as e:  # as in _list
            raise map_hub_error(e, self.ref.repo) from e

    async def probe(self) -> None:
        """Resolve the revision with our token (access check)."""
        await asyncio.to_thread(self._revision)

    async def resolve(self) -> Model:
        self._commit, files = await asyncio.to_thread(self._list)
        if not files:
            raise NotFound(f"{self.name}: the repository has no files at {self._commit[:12]}")
        parts = []
        for f in sorted(files, key=lambda f: f.path):
            source_key = f"hf://{self.ref.repo}@{self._commit}/{f.path}"
            if f.lfs is not None:
                blob = Blob("sha256:" + f.lfs.sha256, int(f.lfs.size))
            elif known := self._learned(source_key):
                blob = Blob(known, int(f.size))
            else:
                # The git blob id checks the whole file: with it, peers may serve it too (issue 11).
                oid = f.blob_id if isinstance(f.blob_id, str) and _GIT_OID.fullmatch(f.blob_id) else None
                blob = Blob(standin_digest(source_key), int(f.size), verified=False, git_sha1=oid)
            self._paths[blob.digest] = f.path
            # HF_ENDPOINT may be any server: its file names are checked like a layer's.
            parts.append(FileEntry(path=safe_path(f.path, context=self.name), blob=blob, source_key=source_key))
        return Model(ref=self.name, digest=f"git:{self._commit}", parts=tuple(parts))

    async def _get(self, path: str, headers: dict[str, str]) -> RawResponse:
        """GET a file's range, following redirects; the token never leaves the Hub's origin.

        The place a file was last redirected to is reused for its other
        ranges; when it refuses (the Hub's CDN links are signed and expire,
        which a pull of hundreds of GB outlives), the file is resolved again.
        """
        located = self._located.get(path)
        if located is not None:
            resp = await self._raw.get(located, _with_token(located, headers, self._token))
            if resp.status not in (401, 403, 404, 410):
                return resp
            resp.close()
            del self._located[path]
        return await self._resolve_and_get(path, headers)

    async def _resolve_and_get(self, path: str, headers: dict[str, str]) -> RawResponse:
        url = f"{_endpoint()}/{self.ref.repo}/resolve/{self._commit}/{quote(path)}"
        url, resp = await follow_redirects(url, lambda at: self._raw.get(at, _with_token(at, headers, self._token)),
                                           RawResponse.close, what=f"{self.name}: {path}")
        self._located[path] = url
        return resp

    async def read(self, blob: Blob, offset: int, length: int) -> AsyncIterator[bytes | memoryview]:
        path = self._paths[blob.digest]
        what = f"{self.name}/{path}"
        resp = await self._get(path, {"Range": f"bytes={offset}-{offset + length - 1}",
                                      "Accept-Encoding": "identity"})
        try:
            async for piece in resp.ranged(offset, length, what=what, size=blob.size):
                yield piece
        finally:
            resp.close()  # at once, even when the caller stops early (ranged's own close waits for its finalizer)

    async def close(self) -> None:
        self._raw.close()
