"""The Redis Cluster the cluster tests run on (tests/cluster_topology.py), and a resharding."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_cluster_serves_every_slot_and_reshards(redis_cluster: Any) -> None:
    assert [redis_cluster.slots_of(i) for i in range(3)] == [5461, 5462, 5461]
    with redis_cluster.client() as cluster:
        cluster.set("{s0}:moved", "kept")
        source = redis_cluster.owner("{s0}:moved")
        target = (source + 1) % 3
        before = redis_cluster.slots_of(source)
        # Every slot of the source: the key's slot moves too, whichever it is.
        redis_cluster.reshard(before, source, target)
        assert redis_cluster.slots_of(source) == 0
        assert redis_cluster.owner("{s0}:moved") == target
        assert cluster.get("{s0}:moved") == "kept"
