"""Head configuration.

``HeadConfig`` holds everything needed to rebuild a set of per-layer heads (type and dimensions, derived from the
base model's config) and is saved as JSON next to the weights. Its ``fingerprint`` is the base model's
:class:`gatekv.models.ModelFingerprint` (shapes and RoPE settings); an adapter refuses a model whose fingerprint
differs (the error names every differing field).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from gatekv.models import ModelFingerprint

__all__ = ["HEAD_TYPES", "HeadConfig", "ModelFingerprint"]

HEAD_TYPES = ("retaining_head", "attention_gate", "linear_gate")
"""Trainable scorer types: Locret retaining head, Attention-Gate, DMS/KVzap-style linear (or MLP) gate."""


@dataclass
class HeadConfig:
    """What is needed to rebuild a set of heads: type, dimensions (from the base model) and hyper-parameters."""

    type: str
    """One of ``HEAD_TYPES``."""
    fingerprint: ModelFingerprint
    """Shapes of the base model the heads belong to."""
    hidden: int = 64
    """MLP width: retaining head hidden units; linear gate MLP width (0 = a single linear map)."""
    act: str = "silu"
    """Activation of the MLPs (the base model's ``hidden_act`` by default)."""
    gate_heads: int = 2
    """Attention gate: heads of its reduced attention."""
    gate_head_dim: int = 16
    """Attention gate: width of each of its heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the linear gate's RMSNorm."""
    init_keep_logit: float = 3.0
    """Initial bias of the gates' output (sigmoid(3) = 0.95: start by keeping almost everything)."""
    recency_buckets: int = 0
    """Learned per-(layer, KV head) bias on a token's distance to the newest token, over this many log2 buckets
    (two per octave: 32 reach 65K tokens); added to the content score, so pre-RoPE heads can learn recency.
    0 = off (content scores only)."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata (base model id, target, training summary); not used to build the heads."""

    def __post_init__(self):
        if self.type not in HEAD_TYPES:
            raise ValueError(f"type: unknown head type {self.type!r}; valid: {list(HEAD_TYPES)}")
        if isinstance(self.fingerprint, dict):
            self.fingerprint = ModelFingerprint(**self.fingerprint)
        for name in ("act",):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "init_keep_logit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")
        for name, low in (("hidden", 0), ("gate_heads", 1), ("gate_head_dim", 1), ("recency_buckets", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.type == "retaining_head" and self.hidden < 1:
            raise ValueError(f"hidden must be >= 1 for a retaining head, got {self.hidden}")

    @classmethod
    def from_model(cls, model, type: str, **options) -> "HeadConfig":
        """Dimensions from ``model``'s config; ``options`` override the defaults (``act`` defaults to hidden_act)."""
        fingerprint = ModelFingerprint.from_model(model)
        options.setdefault("act", getattr(model.config, "hidden_act", "silu"))
        options.setdefault("rms_norm_eps", float(getattr(model.config, "rms_norm_eps", 1e-6)))
        return cls(type=type, fingerprint=fingerprint, **options)

    @property
    def input_width(self) -> int:
        """Features per token: ``(H_q + 2 H_kv) d`` for the retaining head, ``hidden_size`` for the gates."""
        fp = self.fingerprint
        if self.type == "retaining_head":
            return (fp.num_q_heads + 2 * fp.num_kv_heads) * fp.head_dim
        return fp.hidden_size

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are ignored with a warning (saved artifacts are read
        forgivingly), missing required keys are a ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"head config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"ignoring unknown head config keys {unknown}", stacklevel=2)
        missing = sorted({"type", "fingerprint"} - set(data))
        if missing:
            raise ValueError(f"head config lacks {missing}")
        fingerprint = data["fingerprint"]
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint must be a mapping, got {type(fingerprint).__name__}")
        if isinstance(fingerprint, dict):
            fp_names = {f.name for f in dataclasses.fields(ModelFingerprint)}
            lacking = sorted(fp_names - set(fingerprint))
            if lacking:
                raise ValueError(f"head config fingerprint lacks {lacking}")
            fingerprint = ModelFingerprint(**{k: fingerprint[k] for k in fp_names})
        return cls(**{**{k: v for k, v in data.items() if k in names}, "fingerprint": fingerprint})
