"""Head configuration: one type for training and for saved adapters.

``HeadsConfig`` is what a training config says about the heads (type and hyper-parameters). ``HeadConfig`` extends
it with what the base model fixes: it holds everything needed to rebuild a set of per-layer heads (type and
dimensions, derived from the base model's config) and is saved as JSON next to the weights. Its ``fingerprint`` is the base model's
:class:`gatekv.models.ModelFingerprint` (shapes and RoPE settings); an adapter refuses a model whose fingerprint
differs (the error names every differing field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from gatekv.config import read_saved
from gatekv.models import ModelFingerprint

__all__ = ["HEAD_TYPES", "HeadConfig", "HeadsConfig", "ModelFingerprint"]

HEAD_TYPES = ("retaining_head", "attention_gate", "linear_gate")
"""Trainable scorer types: Locret retaining head, Attention-Gate, DMS/KVzap-style linear (or MLP) gate."""


@dataclass
class HeadsConfig:
    """The trainable per-layer modules: type and hyper-parameters (``heads:`` of a training config). Its fields are
    the first fields of :class:`HeadConfig`, which adds what the base model fixes."""

    type: Literal["retaining_head", "attention_gate", "linear_gate"] = "retaining_head"
    """retaining_head (Locret MLP on pre-RoPE q/k/v), attention_gate (small causal MHA on hidden states) or
    linear_gate (Linear(RMSNorm(h)) or a small MLP); one of ``HEAD_TYPES``."""
    hidden: int = 64
    """MLP width of the retaining head / linear gate (linear gate: 0 = one linear map)."""
    act: Optional[str] = None
    """MLP activation; null = the base model's hidden_act."""
    gate_heads: int = 2
    """Attention gate: number of heads of its reduced attention."""
    gate_head_dim: int = 16
    """Attention gate: width of each gate head."""
    gate_window: int = 0
    """Attention gate: 0 = full causal attention over the forward's tokens; W > 0 = each token attends to itself
    and the W - 1 tokens before it (O(T W) cost)."""
    init_keep_logit: float = 3.0
    """Gates: initial output bias (keep probability sigmoid(3) = 0.95 at the start)."""
    recency_buckets: int = 0
    """Learned bias on each token's distance to the newest token (log2 buckets, two per octave; 32 reach 65K
    tokens), per layer and KV head, added to the content score: pre-RoPE heads cannot see position, so recency
    (what a recent window hard-codes) is learned from the labels. 0 = off. Targets cis and teacher."""

    def __post_init__(self):
        if self.type not in HEAD_TYPES:
            raise ValueError(f"type: unknown head type {self.type!r}; valid: {list(HEAD_TYPES)}")
        if self.act is not None and not isinstance(self.act, str):
            raise ValueError(f"act must be a string, got {self.act!r}")
        if isinstance(self.init_keep_logit, bool) or not isinstance(self.init_keep_logit, (int, float)):
            raise ValueError(f"init_keep_logit must be a number, got {self.init_keep_logit!r}")
        for name, low in (("hidden", 0), ("gate_heads", 1), ("gate_head_dim", 1), ("gate_window", 0),
                          ("recency_buckets", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.type == "retaining_head" and self.hidden < 1:
            raise ValueError(f"hidden must be >= 1 for a retaining head (>= 0 for a linear gate), got {self.hidden}")

    def options(self) -> dict:
        """The hyper-parameters as keyword options of :func:`gatekv.heads.build_heads` (``act`` only when set)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(HeadsConfig) if f.name != "type"}
        if options["act"] is None:
            del options["act"]
        return options


@dataclass
class HeadConfig(HeadsConfig):
    """What is needed to rebuild a set of heads: the :class:`HeadsConfig` fields, the base model's fingerprint and
    the settings taken from it (saved as ``gatekv_config.json``'s ``head``)."""

    act: str = "silu"
    """Activation of the MLPs (the base model's ``hidden_act`` by default)."""
    fingerprint: ModelFingerprint = field(default=None, kw_only=True)
    """Shapes of the base model the heads belong to (required)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the linear gate's RMSNorm."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata (base model id, target, training summary); not used to build the heads."""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fingerprint, dict):
            self.fingerprint = ModelFingerprint(**self.fingerprint)
        if not isinstance(self.fingerprint, ModelFingerprint):
            raise ValueError(f"fingerprint: expected a ModelFingerprint, got {self.fingerprint!r}")
        if not isinstance(self.act, str):
            raise ValueError(f"act must be a string, got {self.act!r}")
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)):
            raise ValueError(f"rms_norm_eps must be a number, got {self.rms_norm_eps!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")

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
        """Rebuild from :meth:`to_dict` output, forgivingly (:func:`gatekv.config.read_saved`: unknown keys are
        ignored with a warning, missing required keys are a ``ValueError``)."""
        known = read_saved(cls, data, "head config", required=("type", "fingerprint"), build=False)
        fingerprint = known["fingerprint"]
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint must be a mapping, got {type(fingerprint).__name__}")
        names = {f.name for f in dataclasses.fields(ModelFingerprint)}
        fingerprint = read_saved(ModelFingerprint, {k: v for k, v in fingerprint.items() if k in names},
                                 "head config fingerprint")  # a fingerprint's unknown keys are dropped silently
        return cls(**{**known, "fingerprint": fingerprint})
