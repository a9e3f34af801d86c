"""What an eval run produces: grid cells and the results document (``results.json``, resumable)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RESULTS_VERSION", "SOLVED", "Cell", "EvalResults"]

RESULTS_VERSION = 1
SOLVED = 0.8
"""A task counts as solved by the full cache at this accuracy; ratios to the full cache use solved tasks only."""


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    method: str
    allocator: str
    budget: float
    mode: str
    task: str
    length: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.allocator}|{self.budget:g}|{self.mode}|{self.task}|{self.length}"


@dataclass
class EvalResults:
    """What a run produced (also what ``results.json`` holds)."""

    config: dict
    cells: dict[str, dict] = field(default_factory=dict)
    """``Cell.key`` -> ``{"cell": {...}, "accuracy": float, "n": int, "seconds": float, "samples": [...]}``; real-text
    cells have ``"metrics": {name: mean}`` (``REALTEXT_METRICS``) instead of ``accuracy``."""
    partial: dict[str, list[dict]] = field(default_factory=dict)
    """``Cell.key`` -> per-sample records of a cell still running (shared-prefill cells advance sample by sample)."""

    def accuracy(self, cell: Cell) -> float | None:
        entry = self.cells.get(cell.key)
        return None if entry is None else entry.get("accuracy")

    def to_json(self) -> str:
        document = {"version": RESULTS_VERSION, "config": self.config, "cells": self.cells}
        if self.partial:
            document["partial"] = self.partial
        return json.dumps(document, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> "EvalResults":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is corrupted ({error}); move it away to start over, or restore it to resume"
            ) from None
        if not isinstance(document, dict) or document.get("version") != RESULTS_VERSION or not isinstance(document.get("cells"), dict):
            raise ValueError(f"{path} is not a gatekv eval results file (version {RESULTS_VERSION}); move it away to start over")
        partial = document.get("partial") or {}
        if not isinstance(partial, dict):
            raise ValueError(f"{path}: 'partial' must be a mapping of cell keys to sample records")
        return cls(document.get("config") or {}, document["cells"], partial)
