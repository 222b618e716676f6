"""Credentials given with one request (a pod's volume secret), instead of the daemon's own.

Kubelet passes the Secret named by a CSI volume's ``nodePublishSecretRef`` as
``NodePublishVolumeRequest.secrets``, a map of the Secret's keys to values.
:meth:`SourceCredentials.from_secrets` accepts:

- ``.dockerconfigjson`` (a ``kubernetes.io/dockerconfigjson`` Secret) or
  ``config.json``: Docker's config, read for registry logins;
- ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (and optionally
  ``AWS_SESSION_TOKEN``): S3 keys;
- ``HF_TOKEN`` (or ``token``): a Hugging Face token.

A source given a :class:`SourceCredentials` uses those and nothing else: an
empty one means "anonymous", never "fall back to the daemon's credentials".
The values are never shown: ``repr`` names only which kinds are present, and
:meth:`~SourceCredentials.fingerprint` is a keyed hash that is only good for
comparing credentials within this process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import InvalidReference

_DOCKER_KEYS = (".dockerconfigjson", "config.json")
_HF_KEYS = ("HF_TOKEN", "token")
ACCEPTED_KEYS = (*_DOCKER_KEYS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *_HF_KEYS)

# A per-process key: fingerprints are comparable here and meaningless anywhere else.
_FINGERPRINT_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class SourceCredentials:
    """Per-request credentials for the remote sources; every field may be absent."""

    docker_config: str | None = field(default=None, repr=False)  # Docker config.json text
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    hf_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_secrets(cls, values: Mapping[str, str]) -> SourceCredentials | None:
        """Parse a CSI ``secrets`` map; None when it is empty. Raises :class:`InvalidReference`."""
        if not values:
            return None
        docker = next((values[k] for k in _DOCKER_KEYS if values.get(k)), None)
        if docker is not None:
            try:
                doc = json.loads(docker)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise InvalidReference("the volume's secret: .dockerconfigjson is not a JSON object "
                                       "(create it with kubectl create secret docker-registry)")
        key_id, secret = values.get("AWS_ACCESS_KEY_ID"), values.get("AWS_SECRET_ACCESS_KEY")
        if bool(key_id) != bool(secret):
            raise InvalidReference("the volume's secret: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together")
        found = cls(docker_config=docker, aws_access_key_id=key_id or None, aws_secret_access_key=secret or None,
                    aws_session_token=values.get("AWS_SESSION_TOKEN") or None,
                    hf_token=next((values[k] for k in _HF_KEYS if values.get(k)), None))
        if found == cls():
            raise InvalidReference(f"the volume's secret has none of the keys modelcache reads "
                                   f"({', '.join(ACCEPTED_KEYS)})")
        return found

    def docker_auths(self) -> dict:
        """The parsed Docker config (``{}`` when there is none)."""
        doc = json.loads(self.docker_config) if self.docker_config else {}
        return doc if isinstance(doc, dict) else {}

    def fingerprint(self) -> str:
        """A keyed hash of every field: equal credentials, equal fingerprints (this process only)."""
        text = json.dumps([self.docker_config, self.aws_access_key_id, self.aws_secret_access_key,
                           self.aws_session_token, self.hf_token])
        return hmac.new(_FINGERPRINT_KEY, text.encode(), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        kinds = [name for name, present in (("docker", self.docker_config), ("aws", self.aws_access_key_id),
                                            ("hf", self.hf_token)) if present]
        return f"SourceCredentials({', '.join(kinds) or 'anonymous'}; values redacted)"

    __str__ = __repr__
