"""modelcache: get model weights onto Kubernetes nodes fast.

A node-local content-addressed cache of model files, fed by OCI registries and
local directories, pulled with chunked parallel range requests and verified by
sha256. See DESIGN.md in the steering repository for the data flow.
"""

__version__ = "0.1.0"
