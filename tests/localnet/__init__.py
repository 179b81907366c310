"""Tooling, not runtime: a whole SyftBox network on 127.0.0.1 (``network``) and the demo built on it (``demo``).

Neither role imports anything from here; ``./run.sh demo``, the network tests and the latency benchmark do.
"""

from tests.localnet.network import Datasite, LocalNetwork, free_port

__all__ = ["Datasite", "LocalNetwork", "free_port"]
