"""Allocators: one file per method; ``get_allocator(name)`` builds one by name."""

from gatekv.allocators import (  # noqa: F401
    adakv,
    cake,
    d2o,
    defensive_budget,
    fairkv,
    global_topk,
    pyramid,
    razor,
    threshold,
    uniform,
)
from gatekv.allocators.base import (
    AllocationInput,
    Allocator,
    Budget,
    KeepPlan,
    available_allocators,
    get_allocator,
    register_allocator,
)

__all__ = [
    "AllocationInput",
    "Allocator",
    "Budget",
    "KeepPlan",
    "available_allocators",
    "get_allocator",
    "register_allocator",
]
