"""Losses and metrics of head training. Every loss is computed per sample, then averaged over samples, so a batch of
three gives the mean of the three single-sample losses (padding never counts).

Shapes: ``Ly`` layers, ``B`` samples, ``H`` KV heads, ``P`` prompt tokens (padded to the batch's longest prompt).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["cis_loss", "eviction_rate", "gate_log_mask", "kl_per_sample", "listwise_kl", "topk_overlap"]


def cis_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    prompt_mask: torch.Tensor,
    beta: float = 1.0,
    smoothness: float = 0.0025,
    rank_weight: float = 0.0,
    rank_temperature: float = 1.0,
    rank_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Locret's loss: SmoothL1(s, label) averaged over tokens, heads and layers + ``smoothness`` * sum over layers of
    MSE(s[:, :-1], s[:, 1:]) over neighbouring prompt tokens + ``rank_weight`` * :func:`listwise_kl` (0 = off).

    Regression weighs every token alike, while eviction only uses the order at the top; the listwise term puts the
    weight there (``rank_mask``: (B, P) bool, the tokens it ranks, e.g. the prompt without the protected sinks and
    recent window; default ``prompt_mask``).

    scores:      (Ly, B, H, P) head outputs
    labels:      (Ly, B, H, P) CIS labels; ``-inf`` (a token no future query can see, e.g. outside a sliding window)
                 and entries outside ``prompt_mask`` are ignored
    prompt_mask: (B, P) bool, True for prompt tokens of each sample
    returns:     ``(loss, {"regression": (B,), "smoothness": (B,)})`` with loss a scalar (mean over samples)
    """
    valid = prompt_mask[None, :, None, :] & torch.isfinite(labels)
    target = torch.where(valid, labels, torch.zeros_like(labels))
    per_entry = F.smooth_l1_loss(scores, target, beta=beta, reduction="none") * valid
    regression = per_entry.sum((0, 2, 3)) / valid.sum((0, 2, 3)).clamp(min=1)
    pairs = (prompt_mask[:, 1:] & prompt_mask[:, :-1])[None, :, None, :].to(scores.dtype)
    squared = (scores[..., 1:] - scores[..., :-1]).pow(2) * pairs
    per_layer = squared.sum((2, 3)) / (pairs.sum((2, 3)) * scores.shape[2]).clamp(min=1)  # (Ly, B)
    smooth = per_layer.sum(0)
    total = regression + smoothness * smooth
    parts = {"regression": regression.detach(), "smoothness": smooth.detach()}
    if rank_weight > 0:
        rank = listwise_kl(scores, labels, prompt_mask if rank_mask is None else rank_mask & prompt_mask, rank_temperature)
        total = total + rank_weight * rank
        parts["rank"] = rank.detach()
    return total.mean(), parts


def listwise_kl(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ListNet-style ranking loss per sample: KL(softmax(label / t) || softmax(s / t)) over the masked tokens of each
    (layer, head), averaged over layers and heads. 0 when the scores equal the labels up to a constant; dominated by
    the tokens the labels rank highest.

    scores, labels: (Ly, B, H, P) ; mask: (B, P) bool (``-inf`` labels are left out too) ; returns (B,)
    """
    valid = mask[None, :, None, :] & torch.isfinite(labels)
    neg = torch.finfo(torch.float32).min
    target = F.log_softmax(torch.where(valid, labels.float() / temperature, neg), dim=-1)
    predicted = F.log_softmax(torch.where(valid, scores.float() / temperature, neg), dim=-1)
    per_list = (target.exp() * (target - predicted) * valid).sum(-1)  # (Ly, B, H)
    lists = valid.any(-1).float()  # lists with at least one token
    return (per_list * lists).sum((0, 2)) / lists.sum((0, 2)).clamp(min=1)


def topk_overlap(scores: torch.Tensor, labels: torch.Tensor, prompt_lengths: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Per sample: mean over layers and heads of |top-k(scores) & top-k(labels)| / k over the prompt, k = ceil(fraction P).

    scores, labels: (Ly, B, H, P) ; prompt_lengths: (B,) ; returns (B,) float in [0, 1] (1 = same top-k set)
    """
    out = []
    for b, length in enumerate(prompt_lengths.tolist()):
        if length == 0:
            out.append(torch.tensor(float("nan")))
            continue
        k = max(1, math.ceil(fraction * length))
        s, y = scores[:, b, :, :length].detach().float(), labels[:, b, :, :length].float()
        predicted = s.topk(k, dim=-1).indices
        wanted = torch.zeros_like(y).scatter_(-1, y.topk(k, dim=-1).indices, 1.0)
        out.append(wanted.gather(-1, predicted).sum(-1).mean().cpu() / k)
    return torch.stack(out)


def gate_log_mask(logits: torch.Tensor, mode: str, temperature: float, training: bool) -> torch.Tensor:
    """Additive attention bias on keys from gate keep logits (any shape), differentiable in the logits.

    soft:   log sigmoid(logit / tau)
    gumbel: log sigmoid((logit + logistic noise) / tau) while training, soft otherwise (DMS)
    ste:    0 for kept (sigmoid > 0.5), -1e4 for evicted in the forward; the soft mask's gradient in the backward
    """
    if mode == "gumbel" and training:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = F.logsigmoid(logits / temperature)
    if mode == "ste":
        hard = torch.where(logits > 0, torch.zeros_like(soft), torch.full_like(soft, -1e4))
        return hard + soft - soft.detach()
    return soft


def eviction_rate(logits: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Per sample mean of 1 - sigmoid(logit) over layers, heads and maskable prompt keys.

    logits: (Ly, B, H, T) ; key_mask: (B, T) bool (prompt keys that the gates may evict) ; returns (B,)
    """
    m = key_mask[None, :, None, :].to(logits.dtype)
    evicted = (1 - torch.sigmoid(logits)) * m
    return evicted.sum((0, 2, 3)) / (m.sum((0, 2, 3)) * logits.shape[0] * logits.shape[2]).clamp(min=1)


def kl_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over each sample's valid positions.

    teacher_logits, student_logits: (B, m, V) ; valid: (B, m) bool ; returns (B,)
    """
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1) * valid
    return per_position.sum(-1) / valid.sum(-1).clamp(min=1)
