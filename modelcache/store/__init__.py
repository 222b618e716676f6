"""The node-local, content-addressed store of model files.

On disk, under one root (one filesystem, so renames and hardlinks are atomic)::

    <root>/
      blobs/sha256/<hex>        complete, verified, immutable (0444) file contents
      ingest/<hex>/data         a blob being downloaded, preallocated to full size
      ingest/<hex>/chunks       which fixed-size chunks of data are durable (1 byte each)
      ingest/<hex>.lock         flock held by the one process writing that blob
      ingest/tmp-*              files being unpacked from a layer, named once hashed
      views/<hex>/...           a model's tree: hardlinks to blobs, dirs 0555
      views/.tmp-*              a view being built, renamed into place when whole
      index.sqlite              refs, views, unpacked layers, leases, pins, last use

Guarantees:

- Until ingestion is complete, content is not visible: a blob appears under
  ``blobs/`` only after its bytes were fsync'd and their sha256 checked, by an
  atomic link into place. A clash on commit means the same bytes are already
  there, which counts as success.
- A view appears under ``views/`` whole or not at all, and is named by the
  digest of its listing, so identical trees are built once.
- Locks only save duplicate work (one writer per blob across processes);
  correctness comes from unique temp names and atomic renames.
"""

from .content import BlobIngest, ContentStore
from .index import Index, ViewRecord
from .store import Store
from .views import ViewEntry, view_digest

__all__ = ["BlobIngest", "ContentStore", "Index", "Store", "ViewEntry", "ViewRecord", "view_digest"]
