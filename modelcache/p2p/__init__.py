"""Peer-to-peer sharing between node daemons (issue 11): no tracker, pieces, authenticated, verified.

One job per module:

- :mod:`.pieces`: how a blob is cut into pieces (a function of its size alone) and their digest list;
- :mod:`.ring`: rendezvous hashing of a piece to its candidates (home first, then fallbacks);
- :mod:`.discovery`: who the peers are (a static list, DNS), and :mod:`.slices` (Kubernetes EndpointSlices);
- :mod:`.members`: the live membership as this node sees it, itself excluded, and peers' health;
- :mod:`.signing`: the HMAC that authenticates every peer request;
- :mod:`.client`: a peer as a byte source (short connect timeout, read timeout, one attempt);
- :mod:`.router`: the :class:`~modelcache.transfer.routing.PieceRouter` a pull uses with peers;
- :mod:`.holders`: a home's record of who holds each piece, and whom it sends the next requester to;
- :mod:`.server`: the ``/v1/peer/...`` routes a daemon serves pieces on (with :mod:`.limit`);
- :mod:`.node`: the one object that wires them for a daemon or a CLI pull.
"""
