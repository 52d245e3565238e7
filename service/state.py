"""Where a serving process is between start-up and shutdown, as a value for code to compare (Ray Serve's
readiness, health checks) instead of the human-readable reasons the HTTP routes answer with."""

from enum import Enum


class ServiceState(Enum):
    LOADING = "loading"  # the engine is loading: not ready yet, not broken
    READY = "ready"  # generation is served
    BROKEN = "broken"  # the engine failed to load, or the generation worker died: this process never serves again
    STOPPING = "stopping"  # shutting down: new work is refused, queued work finishes
