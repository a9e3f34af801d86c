"""Trainable scorers: retaining heads (Locret), attention gates (Attention-Gate), linear/MLP gates (DMS/KVzap).

Each is a :class:`HeadsScorer` (a ``torch.nn.Module`` and a gatekv ``Scorer``) with one small module per layer,
sized from the base model's config. Train them with ``gatekv train`` (``gatekv.training``); use them like any scorer::

    heads = load_adapter("runs/x/adapter", model=model)
    with gatekv.compress(model, heads, "uniform", budget=0.1) as session:
        ...

Nothing here imports ``gatekv.training``, Lightning or DeepSpeed.
"""

from gatekv.heads.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, load_adapter, save_adapter
from gatekv.heads.attention_gate import AttentionGate, ste_flags
from gatekv.heads.base import HeadsScorer, head_class
from gatekv.heads.config import HEAD_TYPES, HeadConfig
from gatekv.heads.linear_gate import LinearGate
from gatekv.heads.lora import LoraWeights
from gatekv.heads.retaining_head import RetainingHead
from gatekv.models import ModelFingerprint

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "HEAD_TYPES",
    "Adapter",
    "AttentionGate",
    "HeadConfig",
    "HeadsScorer",
    "LinearGate",
    "LoraWeights",
    "ModelFingerprint",
    "RetainingHead",
    "build_heads",
    "head_class",
    "load_adapter",
    "save_adapter",
    "ste_flags",
]


def build_heads(head_type: str, model, **options) -> HeadsScorer:
    """Fresh heads of ``head_type`` sized for ``model`` (options: :class:`HeadConfig` fields such as ``hidden``)."""
    return head_class(head_type).from_model(model, **options)
