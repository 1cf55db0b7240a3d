"""The prefix index the routing core keeps.

`PrefixIndex` itself now matches with bitmask intersections (a replica recorded once, where it
drops out), so this subclass only keeps the name the routing code and tests use.
"""

from __future__ import annotations

from pools.prefix_index import PrefixIndex


class RoutingPrefixIndex(PrefixIndex):
    """The routing core's `PrefixIndex` (same answers; match costs O(positions) integer `&`)."""

    __slots__ = ()
