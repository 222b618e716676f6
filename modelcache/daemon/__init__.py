"""The node daemon: one asyncio process holding the store, serving HTTP and CSI.

``server.run`` wires everything; the other modules each do one job:
``pulls`` (single-flight pull jobs), ``mounts`` (read-only bind mounts and
their leases), ``api`` (the HTTP API), ``auth`` (who may call it), ``metrics`` (Prometheus).
"""
