"""The CSI node plugin: gRPC servicers over the daemon's pulls and mounts.

``csi_pb2*.py`` are generated from ``csi/csi.proto`` by ``tools/gen_csi.sh``
and committed; do not edit them by hand.
"""

DRIVER_NAME = "csi.modelcache.io"
