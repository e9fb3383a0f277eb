"""Which asset partitions are certainly up to date, in a few queries per asset whatever the shard
count: the planner's fast path in front of Dagster's staleness resolver (``defs/planning.py``).

The resolver answers one partition at a time: about three event-log queries per shard and
partitioned asset, and one per shard for every fan-in asset, so planning an up-to-date pipeline
grew with its shards. :class:`FreshnessProof` reads each asset's latest materialization per
partition in two queries (``get_latest_storage_id_by_partition``, then those records) and
proves FRESH exactly where the resolver's own rules (``CachingStaleStatusResolver``) find no
stale cause:

- the partition has a materialization with provenance (code version and input tags);
- its code version is the asset's current one;
- it recorded every current parent and no removed one;
- an unpartitioned parent's current data version equals the recorded input version;
- no partition of a partitioned parent that it reads (its partition mapping's) has a
  materialization after the recorded input event.

Whatever it cannot prove (missing, a changed input, external, observable or virtual assets,
self-dependencies, an input recorded without its event) it leaves to the resolver, which then
also gives the reason, so plans and reasons stay Dagster's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg
from dagster._core.definitions.data_version import (
    DEFAULT_DATA_VERSION,
    NULL_DATA_VERSION,
    DataVersion,
    extract_data_provenance_from_entry,
    extract_data_version_from_entry,
)

#: Storage ids per records query (SQLite binds at most 32,766 variables).
CHUNK = 1000


class FreshnessProof:
    """Proofs over one state of ``instance`` (make a new one after any event is stored);
    ``queryer``: the resolver's ``CachingInstanceQueryer`` (its prefetched asset records)."""

    def __init__(self, graph, instance: dg.DagsterInstance, queryer):
        self.graph, self.instance, self.queryer = graph, instance, queryer
        self._latest_ids: dict[dg.AssetKey, dict[str, int]] = {}

    def fresh(self, asset_key: dg.AssetKey, partitions: Sequence[str | None]) -> set[str | None]:
        """The ``partitions`` of ``asset_key`` (``[None]``: an unpartitioned asset) proven FRESH."""
        node = self.graph.get(asset_key)
        if not all(_plain(self.graph.get(k)) for k in (asset_key, *node.parent_keys)) or \
                asset_key in node.parent_keys:
            return set()
        entries = self._latest_entries(asset_key, partitions) if node.is_partitioned else \
            {None: self._latest_entry(asset_key)}
        with dg.partition_loading_context(effective_dt=self.queryer.evaluation_time,
                                          dynamic_partitions_store=self.queryer):
            return {p for p in partitions if entries.get(p) is not None and self._proven(node, p, entries[p])}

    def _proven(self, node, partition: str | None, entry) -> bool:
        provenance = extract_data_provenance_from_entry(entry)
        if provenance is None or extract_data_version_from_entry(entry) is None:
            return False
        if node.code_version and provenance.code_version != node.code_version:
            return False
        parents = set(node.parent_keys)
        if set(provenance.input_data_versions) - parents:  # a removed dependency
            return False
        for parent in parents:
            if not provenance.has_input_asset(parent):  # a new dependency
                return False
            if not self.graph.get(parent).is_partitioned:
                if provenance.input_data_versions[parent] != self._current_version(parent):
                    return False
                continue
            cursor = provenance.input_storage_ids[parent]
            if cursor is None:
                return False
            upstream = self.graph.get_parent_partition_keys_for_child(partition, parent, node.key)
            latest = self.latest_ids(parent)
            if any(latest.get(p, 0) > cursor for p in upstream.partitions_subset.get_partition_keys()):
                return False
        return True

    def latest_ids(self, asset_key: dg.AssetKey) -> dict[str, int]:
        """Partition -> storage id of its latest materialization (one query per asset)."""
        if asset_key not in self._latest_ids:
            self._latest_ids[asset_key] = dict(self.instance.get_latest_storage_id_by_partition(
                asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION))
        return self._latest_ids[asset_key]

    def _latest_entries(self, asset_key: dg.AssetKey, partitions: Iterable[str | None]) -> dict:
        """Partition -> event log entry of its latest materialization (the wanted partitions)."""
        latest = self.latest_ids(asset_key)
        ids = sorted(latest[p] for p in set(partitions) if p in latest)
        entries = {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for record in self.instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=chunk), limit=len(chunk)).records:
                entries[record.partition_key] = record.event_log_entry
        return entries

    def _latest_entry(self, asset_key: dg.AssetKey):
        record = self.queryer.get_asset_record(asset_key)
        latest = record.asset_entry.last_materialization_record if record is not None else None
        return latest.event_log_entry if latest is not None else None

    def _current_version(self, asset_key: dg.AssetKey) -> DataVersion:
        """As the resolver reads an unpartitioned asset's current data version."""
        entry = self._latest_entry(asset_key)
        if entry is None:
            return NULL_DATA_VERSION
        return extract_data_version_from_entry(entry) or DEFAULT_DATA_VERSION


def _plain(node) -> bool:
    """A materializable asset whose status the resolver derives from its materializations only."""
    return node.is_materializable and not (node.is_external or node.is_observable or node.is_virtual)
