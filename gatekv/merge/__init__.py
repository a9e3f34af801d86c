"""Merging methods (EMS, D2O, KVMerger, Razor's compensation token); ``get_merger(name)`` builds one by name."""

from gatekv.merge import d2o, ems, kvmerger, razor  # noqa: F401  (registration)
from gatekv.merge.base import MergeContext, Merger, MergeSpec, available_mergers, get_merger, register_merger

__all__ = ["MergeContext", "MergeSpec", "Merger", "available_mergers", "get_merger", "register_merger"]
