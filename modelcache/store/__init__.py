"""The node-local, content-addressed store of model files.

On disk, under one root (one filesystem, so renames and hardlinks are atomic)::

    <root>/
      blobs/sha256/<hex>        complete, verified, immutable (0444) file contents
      ingest/<hex>/data         a blob being downloaded (never preallocated: sizes are claims)
      ingest/<hex>/chunks       which fixed-size chunks of data are durable (1 byte each)
      ingest/<hex>/partial      durable leading bytes of chunks not done (what an interrupt kept)
      ingest/<hex>.lock         flock held by the one process writing that blob
      ingest/tmp-<pid>.<start>-*  files being unpacked from a layer, named once hashed, and
                                (``...-gone-<hex>``) dropped layers being unlinked (.unlinker)
      views/<hex>/...           a model's tree: hardlinks to blobs, dirs 0555
      views/.tmp-<pid>.<start>-*  a view being built, renamed into place when whole
      views/.del-*              a view already forgotten, being deleted
      views/.corrupt-*          a mounted view of a corrupt blob, moved aside until unmounted
      index.sqlite              refs, views, blob sizes, layers, leases, last use

Guarantees:

- Until ingestion is complete, content is not visible: a blob appears under
  ``blobs/`` only after its bytes were fsync'd and their sha256 checked, by an
  atomic link into place. A clash on commit means the same bytes are already
  there, which counts as success.
- A view appears under ``views/`` whole or not at all, and is named by the
  digest of its listing, so identical trees are built once.
- Locks only save duplicate work (one writer per blob across processes);
  correctness comes from unique temp names and atomic renames.

Roles (:mod:`.roles`): a Provider (reads committed blobs and durable chunks
of ingests), an Ingester (opens writers; all the transfer engine needs), an
IngestManager and a ContentManager, implemented on disk by
:class:`ContentStore` and in memory by :class:`~.memory.MemoryContentStore`.

Who holds what (issue 10):

- Leases are the only roots. Content no lease holds may be deleted at any
  moment; content a live lease holds is never deleted. A lease has a kind
  (pull, mount, pin, upload), an owner, and for pulls the process (pid and
  start time) whose death ends it.
- A holder takes its lease *before* it relies on the content: a pull holds
  the blobs it needs before checking they exist, each blob it commits is
  held in the transaction that counts it, before it is linked into
  ``blobs/``, and its view before the tree is built. A view is handed to a
  mount only leased, in the transaction that looked it up.
- Deleting is decided and done under the index's write lock: a blob is
  unlinked, and a view's rows removed and its tree renamed to ``.del-*``,
  inside the transaction that found no lease on it. So a reader sees the
  old state or the new, and a crash leaves either the old state or one
  that the next gc finishes (``.del-*``, temp names of dead processes,
  views built but never recorded).
- The one exception: a blob found corrupt (by scrub or ``verify --delete``,
  :mod:`.scrub`) is taken out of service whatever holds it, since its bytes
  are not the content any lease asked for. Its views go the same way (rows,
  then the tree renamed away in one transaction); a mounted one is renamed
  aside to ``views/.corrupt-*``, never deleted under its pod.
"""

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .content import BlobIngest, ContentStore
    from .index import Index, ViewRecord
    from .store import Store
    from .views import ViewEntry, view_digest

# Each loaded when first asked for: a warm pull reads the index and loads none of the unpacker (issue 13).
__getattr__ = exports(globals(), {"BlobIngest": "content", "ContentStore": "content", "Index": "index",
                                 "ViewRecord": "index", "Store": "store", "ViewEntry": "views",
                                 "view_digest": "views"})

__all__ = ["BlobIngest", "ContentStore", "Index", "Store", "ViewEntry", "ViewRecord", "view_digest"]
