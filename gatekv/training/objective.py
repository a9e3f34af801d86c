"""The training objective: frozen backbone + trainable heads -> loss and metrics for one batch (no Lightning here).

A batch (``gatekv.training.data.collate``) holds right-padded token ids; each sample is a prompt (the context to be
evicted, ``prompt_lengths``) followed by a response (future queries)::

    input_ids (B, L) int64, attention_mask (B, L), prompt_lengths (B,), lengths (B,)

Targets (../shared/methods.md):

- ``cis``: one no-grad forward of the frozen model computes, per layer, the heads' inputs and Locret's label
  (max over response queries and the GQA group of the pre-softmax logit, post-RoPE). The heads score the prompt
  tokens; loss = SmoothL1 + smoothness (+ an optional listwise ranking term outside the protected sinks and window).
  With a feature cache the frozen forward runs once per sample.
- ``distill``: teacher = the frozen model (no-grad, full sequence, KV cache kept). The gates score the prompt tokens
  from the teacher's features; the student re-runs only the response tokens on the teacher's prompt cache with the
  gates' log keep probabilities added to the prompt keys (exact: nothing upstream of the prompt rows depends on the
  gates). loss = KL(teacher || student) on response positions + weight * max(0, ramped target - eviction rate).
  With LoRA the student is the whole LoRA'd model over the full sequence (gates read its own features).
- ``lm`` (Attention-Gate's recipe): one forward of the (LoRA'd) model over the whole sample with the gates' log keep
  probabilities added to the prompt keys for the response rows (each layer's gates read that layer's live
  features); loss = cross-entropy of every response token (the first one predicted by the prompt's last row, which
  attends the full prompt as at inference, where the prompt is compressed after its prefill) + weight * max(0,
  ramped target - eviction rate). ``gates: false``: the same cross-entropy without any mask (LoRA-only baseline).
- ``teacher``: the labels are the scores a registered scorer (``target.teacher``: kvzip, snapkv, ...) gives the prompt
  tokens inside :func:`gatekv.compress` (:func:`gatekv.training.teacher.teacher_scores`; query-aware: the response
  tokens observe), log-transformed by default; same loss as ``cis`` (SmoothL1 + smoothness + optional listwise
  ranking). With a feature cache the teacher runs once per sample (raw scores are cached, the transform is not).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gatekv.heads import HeadsScorer, ModelFingerprint
from gatekv.training.capture import TrainingCapture
from gatekv.training.config import TargetConfig
from gatekv.training.losses import cis_loss, eviction_rate, gate_log_mask, kl_per_sample, topk_overlap
from gatekv.training.teacher import build_teacher, teacher_scores

__all__ = ["FeatureCache", "HeadObjective"]

_TOKEN_AXIS = {"hidden_states": 1, "pre_rope_queries": 2, "pre_rope_keys": 2, "pre_rope_values": 2}


def _response_rows(prompt_lengths: torch.Tensor, lengths: torch.Tensor, offset: int = 0):
    """Query rows of every sample's response: ``(rows (B, n) int64, positions (B, n) int64, -1 = none)``.

    rows index the forward's tokens (position - offset); n = longest response.
    """
    n = int((lengths - prompt_lengths).max().clamp(min=1))
    positions = prompt_lengths[:, None] + torch.arange(n, device=lengths.device)[None]
    valid = positions < lengths[:, None]
    rows = torch.where(valid, positions, prompt_lengths[:, None].clamp(max=lengths[:, None] - 1)) - offset
    return rows.clamp(min=0), torch.where(valid, positions, torch.full_like(positions, -1))


def _slice_tokens(name: str, tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return tensor.narrow(_TOKEN_AXIS[name], start, end - start)


class FeatureCache:
    """Per-sample cache of the frozen model's head inputs and labels (CIS labels, or a teacher's raw scores).

    One safetensors file per sample under ``directory/<model+features(+labels) key>/``, named by a hash of the sample's
    tokens and prompt length; written atomically (temp file + rename), so a killed run never leaves a torn entry.
    Features are stored in ``dtype`` (labels in float32) and always used after that round trip, so a cache hit
    and a miss give the same loss. :meth:`use_labels` keys the labels (a teacher and its options): entries of other
    labels are never read. The key names the cached features (``feature_names``), not the head type: heads that
    read the same features (the attention and the linear gate both read ``hidden_states``) share one cache.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: ModelFingerprint, model_name: str,
                 feature_names: Iterable[str], dtype: torch.dtype):
        if isinstance(feature_names, str):
            raise TypeError(f"feature_names must be a collection of feature names, got the string {feature_names!r}")
        self._root = Path(directory)
        self._key = [model_name, fingerprint.__dict__, sorted(feature_names), str(dtype)]
        self.labels_key: dict | None = None
        self.directory = self._directory()
        self.dtype = dtype
        self.hits = self.misses = 0

    def _directory(self) -> Path:
        key = self._key if self.labels_key is None else [*self._key, self.labels_key]  # cis: the original key
        return self._root / hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def use_labels(self, labels_key: dict | None) -> None:
        """Key the cached labels by ``labels_key`` (JSON-able; None = CIS labels)."""
        self.labels_key = labels_key
        self.directory = self._directory()

    def path(self, tokens: torch.Tensor, prompt_length: int) -> Path:
        digest = hashlib.sha1(tokens.to(torch.int64).cpu().numpy().tobytes() + str(prompt_length).encode()).hexdigest()
        return self.directory / f"{digest}.safetensors"

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """``({name: (Ly, 1, P, F)}, labels (Ly, 1, H, P))`` of one sample, or None if absent or unreadable."""
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a foreign or damaged file: recompute and overwrite
            return None
        labels = tensors.pop("labels", None)
        if labels is None:
            return None
        return tensors, labels

    def store(self, path: Path, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous() for name, t in inputs.items()}
        tensors["labels"] = labels.contiguous()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)


class HeadObjective(nn.Module):
    """Backbone (frozen) + heads -> ``(loss, metrics)`` for a batch. Usable without Lightning (DeepSpeed engine).

    backbone:      the causal LM (requires_grad False, eval mode; LoRA parameters excepted when ``lora``)
    heads:         the trainable :class:`HeadsScorer`
    target:        target settings
    feature_cache: optional :class:`FeatureCache` (cis, teacher)
    lora:          the backbone carries trainable peft LoRA layers (distill only); the teacher runs with them off
    tokenizer:     the model's tokenizer, for teacher scorers that build prompts from it (KVzip's repeat prompt)
    """

    def __init__(self, backbone: nn.Module, heads: HeadsScorer, target: TargetConfig,
                 feature_cache: FeatureCache | None = None, lora: bool = False, tokenizer=None):
        super().__init__()
        self.teacher = None
        if target.kind == "teacher":
            self.teacher = build_teacher(target.teacher, target.teacher_options, tokenizer)
            if feature_cache is not None:
                feature_cache.use_labels({"teacher": target.teacher, "options": repr(self.teacher),
                                          "query": target.teacher_query, "window": target.window,
                                          "sinks": target.sinks})
        if not lora:  # frozen, whatever the caller did; with LoRA peft leaves only the lora_* weights trainable
            backbone.requires_grad_(False)
        backbone.eval()
        self.backbone = backbone
        self.heads = heads
        self.target = target
        self.feature_cache = feature_cache
        self.lora = lora
        self.split_student = True
        """distill without LoRA: re-run only the response rows as the student (exact); False = whole sequence."""

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (unwrapped from peft)."""
        model = self.backbone
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def capture(self) -> TrainingCapture:
        needs = self.heads.needs
        return TrainingCapture(self.hf_model, hidden="hidden_states" in needs, pre_rope="pre_rope" in needs)

    def _adapters_off(self):
        import contextlib

        return self.backbone.disable_adapter() if self.lora else contextlib.nullcontext()

    def forward(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar) and per-sample metrics (each (B,)) of ``batch`` at optimizer step ``step``."""
        if self.target.kind == "cis":
            return self.cis_step(batch)
        if self.target.kind == "teacher":
            return self.teacher_step(batch)
        if self.target.kind == "lm":
            return self.lm_step(batch, step)
        return self.distill_step(batch, step)

    # -- cis -----------------------------------------------------------------------------------------------------
    def stacked_inputs(self, sinks: list[dict], width: int) -> dict[str, torch.Tensor]:
        """Head inputs of the first ``width`` tokens, stacked over layers: ``{name: (Ly, B, width, F)}`` (detached)."""
        per_layer = [self.heads.layer_inputs(sink) for sink in sinks]
        return {name: torch.stack([inputs[name][:, :width].detach() for inputs in per_layer]) for name in per_layer[0]}

    def cis_inputs(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Stacked head inputs ``{name: (Ly, B, P, F)}`` (prompt tokens, padded to the longest prompt), labels
        ``(Ly, B, H, P)`` and the prompt mask ``(B, P)``: from the feature cache, else from a frozen forward."""
        return self._cached_inputs(batch, self._cis_live)

    def _cached_inputs(self, batch: dict, live):
        """``live(batch) -> (inputs, labels, mask)`` through the feature cache (each sample computed once)."""
        prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
        if self.feature_cache is None:
            return live(batch)
        cache = self.feature_cache
        paths = [cache.path(batch["input_ids"][b, : int(lengths[b])], int(prompt_lengths[b])) for b in range(len(lengths))]
        loaded = [cache.load(p) for p in paths]
        if any(item is None for item in loaded):
            inputs, labels, _ = live(batch)
            for b, item in enumerate(loaded):
                if item is None:
                    p = int(prompt_lengths[b])
                    sample = {name: t[:, b : b + 1, :p].to(cache.dtype).cpu() for name, t in inputs.items()}
                    sample_labels = labels[:, b : b + 1, :, :p].float().cpu()
                    cache.store(paths[b], sample, sample_labels)
                    loaded[b] = (sample, sample_labels)
                    cache.misses += 1
                else:
                    cache.hits += 1
        else:
            cache.hits += len(loaded)
        return self._merge_samples(loaded, prompt_lengths)

    @staticmethod
    def _merge_samples(samples, prompt_lengths):
        """Per-sample cached ``({name: (Ly, 1, P_b, F)}, (Ly, 1, H, P_b))`` -> padded batch tensors (float32)."""
        device = prompt_lengths.device
        width = int(prompt_lengths.max())
        inputs = {}
        for name in samples[0][0]:
            parts = []
            for sample_inputs, _ in samples:
                t = sample_inputs[name].to(device=device, dtype=torch.float32)
                if t.shape[2] < width:
                    t = torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))
                parts.append(t)
            inputs[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        labels = [torch.nn.functional.pad(l.to(device), (0, width - l.shape[-1]), value=float("-inf")) for _, l in samples]
        labels = labels[0] if len(labels) == 1 else torch.cat(labels, dim=1)
        mask = torch.arange(width, device=device)[None] < prompt_lengths[:, None]
        return inputs, labels, mask

    def _cis_live(self, batch: dict):
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)[None].expand(ids.shape[0], -1)
        width = int(prompt_lengths.max())
        with torch.no_grad(), self.capture() as capture:
            capture.prepare(attention_mask.bool(), positions, label_queries=_response_rows(prompt_lengths, lengths))
            self.hf_model.get_decoder()(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
            inputs = self.stacked_inputs(capture.sinks, width)
            labels = torch.stack(capture.labels)[..., :width]
        mask = torch.arange(width, device=ids.device)[None] < prompt_lengths[:, None]
        return inputs, labels, mask

    def cis_step(self, batch: dict):
        inputs, labels, mask = self.cis_inputs(batch)
        return self._regression_step(batch, inputs, labels, mask)

    # -- teacher -------------------------------------------------------------------------------------------------
    def teacher_inputs(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like :meth:`cis_inputs`, with the teacher's raw scores ``(Ly, B, H, P)`` as labels (``-inf`` = padding)."""
        return self._cached_inputs(batch, self._teacher_live)

    def _teacher_live(self, batch: dict):
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        width = int(prompt_lengths.max())
        with torch.no_grad(), self.capture() as capture:
            capture.prepare(attention_mask.bool(), positions)
            self.hf_model.get_decoder()(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
            inputs = self.stacked_inputs(capture.sinks, width)
        labels = []
        for b in range(ids.shape[0]):
            p, n = int(prompt_lengths[b]), int(lengths[b])
            query = ids[b, p:n] if self.target.teacher_query and n > p else None
            scores = teacher_scores(self.hf_model, self.teacher, ids[b, :p], query, self.target.window, self.target.sinks)
            labels.append(torch.nn.functional.pad(scores, (0, width - p), value=float("-inf")))
        labels = torch.stack(labels, dim=1).to(ids.device)  # (Ly, B, H, P)
        mask = torch.arange(width, device=ids.device)[None] < prompt_lengths[:, None]
        return inputs, labels, mask

    def teacher_labels(self, raw: torch.Tensor) -> torch.Tensor:
        """The regression target from raw teacher scores (``-inf`` padding kept): log(max(s, floor)) or s."""
        if self.target.teacher_transform == "none":
            return raw
        return torch.where(torch.isfinite(raw), raw.clamp(min=self.target.teacher_floor).log(), raw)

    def teacher_step(self, batch: dict):
        inputs, raw, mask = self.teacher_inputs(batch)
        return self._regression_step(batch, inputs, self.teacher_labels(raw), mask)

    def _regression_step(self, batch: dict, inputs, labels, mask):
        """cis / teacher: SmoothL1 + smoothness (+ listwise ranking) of the heads' scores against ``labels``."""
        scores = self.heads.stacked_scores(inputs, mask)
        t = self.target
        rank_mask = None
        if t.rank_weight > 0:
            rank_mask = self.maskable_keys(batch["prompt_lengths"].to(mask.device), mask.shape[1])
        loss, parts = cis_loss(scores, labels, mask, t.smooth_l1_beta, t.smoothness, t.rank_weight, t.rank_temperature,
                               rank_mask)
        overlap = topk_overlap(scores, labels, batch["prompt_lengths"], t.topk_fraction)
        return loss, {**parts, "topk_overlap": overlap}

    # -- distill -------------------------------------------------------------------------------------------------
    def eviction_target(self, step: int) -> float:
        ramp = self.target.eviction_ramp_steps
        return self.target.eviction_target * (1.0 if ramp == 0 else min(1.0, step / ramp))

    def maskable_keys(self, prompt_lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
        """(B, T) bool: prompt keys outside the protected sinks and recent window (the keys distill's gates may mask
        and the cis ranking term ranks)."""
        j = torch.arange(num_keys, device=prompt_lengths.device)[None]
        return (j >= self.target.sinks) & (j < prompt_lengths[:, None] - self.target.window)

    def gate_bias(self, logits: torch.Tensor, maskable: torch.Tensor, length: int) -> torch.Tensor:
        """Gate logits (B, H, P) of the first P keys -> the additive log keep-mask (B, H, T) on the ``maskable``
        (B, T) prompt keys only (sinks, recent window and response keys get 0)."""
        full = logits.new_zeros(logits.shape[0], logits.shape[1], length)
        full[..., : logits.shape[-1]] = gate_log_mask(logits, self.target.mask, self.target.temperature, self.training)
        return full * maskable[:, None, :]

    def live_gate_bias_fn(self, capture: TrainingCapture, valid_prompt: torch.Tensor, maskable: torch.Tensor,
                          length: int, layer_logits: list[torch.Tensor]):
        """A ``bias_fn`` for ``capture.prepare``: each layer's gates score the first P = ``valid_prompt.shape[1]``
        keys from that layer's live features (the student's own); their logits are appended to ``layer_logits``."""
        width = valid_prompt.shape[1]

        def bias_fn(layer: int) -> torch.Tensor:
            sink = capture.sinks[layer]
            feats = {name: _slice_tokens(name, sink[name], 0, width) for name in self.heads.feature_names}
            layer_logits.append(self.heads.layer_scores(layer, feats, valid_prompt))
            return self.gate_bias(layer_logits[-1], maskable, length)

        return bias_fn

    def distill_step(self, batch: dict, step: int):
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
        batch_size, length = ids.shape
        positions = torch.arange(length, device=ids.device)[None].expand(batch_size, -1)
        key_valid = attention_mask.bool()
        maskable = self.maskable_keys(prompt_lengths, length)
        # KL positions: response tokens that predict a next response token
        kl_rows, kl_positions = _response_rows(prompt_lengths, (lengths - 1).clamp(min=prompt_lengths))
        kl_valid = kl_positions >= 0
        decoder, lm_head = self.hf_model.get_decoder(), self.hf_model.get_output_embeddings()
        split = self.split_student and not self.lora
        start = int(prompt_lengths.min())
        width = int(prompt_lengths.max())

        def gather(hidden, offset=0):
            index = (kl_rows - offset).clamp(min=0)[:, :, None].expand(-1, -1, hidden.shape[-1])
            return torch.gather(hidden, 1, index)

        with self.capture() as capture:
            with torch.no_grad(), self._adapters_off():
                capture.prepare(key_valid, positions, label_queries=_response_rows(prompt_lengths, lengths),
                                keep_prefix=start if split else None)
                out = decoder(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
                teacher_logits = lm_head(gather(out.last_hidden_state))
                labels = torch.stack(capture.labels)[..., :width]
                teacher_inputs = self.stacked_inputs(capture.sinks, width) if split else None
            valid_prompt = torch.arange(width, device=ids.device)[None] < prompt_lengths[:, None]
            if split:
                # student: only the tokens after the shortest prompt, on the teacher's keys/values of the tokens
                # before it (exact: no prompt row depends on the gates, only response rows see the bias)
                logits = self.heads.stacked_scores(teacher_inputs, valid_prompt)
                biases = [self.gate_bias(logits[l], maskable, length) for l in range(logits.shape[0])]
                capture.prepare(key_valid, positions[:, start:], bias_fn=lambda l: biases[l], bias_from=prompt_lengths,
                                use_prefix=True)
                out = decoder(input_ids=ids[:, start:], attention_mask=attention_mask[:, start:],
                              position_ids=positions[:, start:], use_cache=False)
                student_logits = lm_head(gather(out.last_hidden_state, start))
            else:
                # student: the whole (LoRA'd) model; each layer's gates read that layer's live features
                layer_logits: list[torch.Tensor] = []
                bias_fn = self.live_gate_bias_fn(capture, valid_prompt, maskable, length, layer_logits)
                capture.prepare(key_valid, positions, bias_fn=bias_fn, bias_from=prompt_lengths)
                out = decoder(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
                student_logits = lm_head(gather(out.last_hidden_state))
                logits = torch.stack(layer_logits)
        kl = kl_per_sample(teacher_logits, student_logits, kl_valid)
        rate = eviction_rate(logits, maskable[:, :width])
        target = self.eviction_target(step)
        hinge = torch.relu(target - rate)
        loss = (kl + self.target.eviction_weight * hinge).mean()
        overlap = topk_overlap(logits, labels, prompt_lengths, self.target.topk_fraction)
        metrics = {
            "kl": kl.detach(),
            "eviction_rate": rate.detach(),
            "eviction_target": torch.full_like(rate, target).detach(),
            "topk_overlap": overlap,
        }
        return loss, metrics

    # -- lm --------------------------------------------------------------------------------------------------------
    def lm_step(self, batch: dict, step: int):
        """Attention-Gate's objective: cross-entropy of the response under the gates' soft masks + the eviction hinge
        (``gates: false``: the cross-entropy alone, no masks)."""
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
        batch_size, length = ids.shape
        positions = torch.arange(length, device=ids.device)[None].expand(batch_size, -1)
        maskable = self.maskable_keys(prompt_lengths, length)
        # rows P-1 .. L-2 predict the response tokens P .. L-1; row P-1 is a prompt row (it sees no mask: at inference
        # the prompt is compressed after its prefill, which already predicted the first response token)
        rows, row_positions = _response_rows((prompt_lengths - 1).clamp(min=0), (lengths - 1).clamp(min=prompt_lengths))
        valid = row_positions >= 0
        targets = torch.gather(ids, 1, (rows + 1).clamp(max=length - 1))
        decoder, lm_head = self.hf_model.get_decoder(), self.hf_model.get_output_embeddings()
        width = int(prompt_lengths.max())
        valid_prompt = torch.arange(width, device=ids.device)[None] < prompt_lengths[:, None]
        layer_logits: list[torch.Tensor] = []
        kwargs = dict(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        if self.target.gates:
            with self.capture() as capture:
                bias_fn = self.live_gate_bias_fn(capture, valid_prompt, maskable, length, layer_logits)
                capture.prepare(attention_mask.bool(), positions, bias_fn=bias_fn, bias_from=prompt_lengths)
                hidden = decoder(**kwargs).last_hidden_state
        else:
            hidden = decoder(**kwargs).last_hidden_state
        index = rows[:, :, None].expand(-1, -1, hidden.shape[-1])
        logits_lm = lm_head(torch.gather(hidden, 1, index)).float()  # (B, n, V)
        nll = torch.nn.functional.cross_entropy(logits_lm.transpose(1, 2), targets, reduction="none")  # (B, n)
        ce = (nll * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        if self.target.gates:
            target = self.eviction_target(step)
            rate = eviction_rate(torch.stack(layer_logits), maskable[:, :width])
            loss = (ce + self.target.eviction_weight * torch.relu(target - rate)).mean()
        else:
            target, rate = 0.0, torch.zeros_like(ce)
            loss = ce.mean()
        metrics = {"ce": ce.detach(), "eviction_rate": rate.detach(),
                   "eviction_target": torch.full_like(rate, target).detach()}
        return loss, metrics
