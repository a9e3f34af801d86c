"""gatekv: learned and training-free KV-cache eviction with a physically compacted ragged cache."""

from gatekv.allocators import Allocator, Budget, KeepPlan, available_allocators, get_allocator
from gatekv.cache import CompressedCache
from gatekv.compress import CompressionSession, CompressionStats, SharedPrefill, compress, shared_prefill
from gatekv.inference import Answer, GateKV
from gatekv.scorers import LayerContext, Scorer, available_scorers, get_scorer
from gatekv.settings import CompressionConfig
from gatekv.version import __version__

__all__ = [
    "Allocator",
    "Answer",
    "Budget",
    "CompressedCache",
    "CompressionConfig",
    "CompressionSession",
    "CompressionStats",
    "GateKV",
    "KeepPlan",
    "LayerContext",
    "Scorer",
    "SharedPrefill",
    "__version__",
    "available_allocators",
    "available_scorers",
    "compress",
    "get_allocator",
    "get_scorer",
    "shared_prefill",
]
