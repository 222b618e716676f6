"""What the daemon and the CLI share about Kubernetes: the ModelPrewarm API's names, the warm-node label,
label selectors, rendezvous choice of nodes, and the list/watch and leader-election loops.

Only the ``kubernetes`` client (imported lazily where it is needed) stands
below this package; the daemon's pre-warm controller and the ``prewarm`` CLI
stand above it.
"""
