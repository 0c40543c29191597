"""The foundation model: vision encoder, text encoder, heads; its forward returns named outputs.

Batch keys (what a site's data pipeline provides; each objective needs only some):
    volume         [B, 1, D, H, W] preprocessed volumes (or use ``study``)
    study          [B, S, 1, D, H, W] a study of S scans (HLIP); ``study_mask`` [B, S] True = real scan
    report         list[str] of B report texts (possibly augmented) for CLIP and multi-view
    report_target  list[str], optional: texts the report decoder learns (default: ``report``)
    osl_index      LongTensor [K]: which volume sentence pair k is about
    osl_positive   list[str] K true sentences; ``osl_negative`` list[str] K opposites
    views          [B, M, 1, d, h, w], optional: local crops (default: random crops of ``volume``)
    finding_labels [B, F] 0/1 in vocabulary order; ``finding_mask`` [B, F] optional (1 = labelled)
    mae_noise      [N, L], optional: MAE masking noise per scan (N real scans, L tokens); drawn if absent
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .heads import AttentionPool, MAEDecoder, ViewTextFusion
from .reports import NO_FINDINGS_SENTENCE, finding_sentence, get_vocabulary
from .text import ReportDecoder, TextEncoder, load_tokenizer
from .vision import VisionOutput, as_study, build_vision_encoder, patchify
from .volumes import random_views


class FoundationModel(nn.Module):
    """The shared 3D vision-language model. Every head is always built, so all sites and the server
    share one state-dict layout whatever objectives a run recipe weights.

    Args:
        cfg: the model config (see :func:`shared_models.load_preset`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.vision.width
        self.findings = get_vocabulary(cfg.vocabulary)
        self.tokenizer = load_tokenizer(cfg.text)
        self.vision = build_vision_encoder(cfg.vision, (cfg.preprocess.norm_mean, cfg.preprocess.norm_std))
        self.text = TextEncoder(cfg.text, self.tokenizer)
        self.vision_pool = AttentionPool(width, cfg.pool_heads)
        self.vision_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if cfg.clip_loss == "sigmoid":
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))  # SigLIP's initial bias
        self.findings_head = nn.Linear(width, len(self.findings))
        self.view_fusion = ViewTextFusion(width, self.text.width, cfg.pool_heads)
        self.view_pool = AttentionPool(width, cfg.pool_heads)
        self.report_decoder = ReportDecoder(cfg.decoder, width, self.tokenizer, self._decoder_tokens(),
                                            num_findings=len(self.findings))
        if cfg.vision.kind == "vit":
            self.mae_decoder = MAEDecoder(width, cfg.mae, math.prod(cfg.vision.patch_size))

    def _decoder_tokens(self) -> list[int] | None:
        """The closed output vocabulary of a findings-report decoder: every token of its sentences."""
        if self.cfg.decoder.target != "findings":
            return None
        sentences = [finding_sentence(name, True) for name in self.findings] + [NO_FINDINGS_SENTENCE]
        return sorted({t for ids in self.tokenizer(sentences)["input_ids"] for t in ids})

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> Tensor:
        """The CLIP temperature's inverse, ``exp(logit_scale)`` clamped to ``[1, exp(logit_scale_max)]``."""
        return self.logit_scale.clamp(0.0, self.cfg.logit_scale_max).exp()

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts should be a list of strings.")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, return_tensors="pt",
            max_length=max_length or self.cfg.text.max_length,
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    # ---- public inference API -------------------------------------------------------------------
    def encode_volume(self, volumes: Tensor, scan_mask: Tensor | None = None) -> Tensor:
        """``[B, 1, D, H, W]`` (or a study ``[B, S, 1, D, H, W]``) -> L2-normalized ``[B, E]``."""
        vis = self.vision(volumes.to(self.device), scan_mask)
        return F.normalize(self.vision_proj(self.vision_pool(vis.tokens, vis.valid)), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """A list of B texts -> L2-normalized ``[B, E]``."""
        pooled, _, _ = self.text(list(texts))
        return F.normalize(self.text_proj(pooled), dim=-1)

    def predict_findings(self, volumes: Tensor, scan_mask: Tensor | None = None) -> Tensor:
        """Probabilities ``[B, F]`` of the findings head, in ``self.findings`` order."""
        vis = self.vision(volumes.to(self.device), scan_mask)
        return torch.sigmoid(self.findings_head(self.vision_pool(vis.tokens, vis.valid)))

    @torch.no_grad()
    def generate_report(
        self, volumes: Tensor, max_new_tokens: int = 64, num_beams: int = 1, scan_mask: Tensor | None = None
    ) -> list[str]:
        """Greedy (or beam) report generation from the volumes' tokens."""
        vis = self.vision(volumes.to(self.device), scan_mask)
        memory, valid = self._decoder_memory(vis, self.vision_pool(vis.tokens, vis.valid))
        ids = self.report_decoder.generate(memory, valid, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], objectives: Iterable[str]) -> dict[str, Tensor]:
        """Named outputs for ``objectives`` (see :mod:`shared_models.objectives` for who needs what)."""
        needed = set(objectives)
        out: dict[str, Tensor] = {"logit_scale": self.scale()}
        if self.cfg.clip_loss == "sigmoid":
            out["logit_bias"] = self.logit_bias
        if needed & {"clip", "osl", "findings", "report", "multiview"}:
            vis = self.vision(*self._study(batch))
            pooled = self.vision_pool(vis.tokens, vis.valid)
            out["volume_embeddings"] = F.normalize(self.vision_proj(pooled), dim=-1)
            if "findings" in needed:
                out.update(self._findings_outputs(batch, pooled))
            if "report" in needed:
                out.update(self._report_outputs(batch, vis, pooled))
        if needed & {"clip", "multiview"}:
            text_pooled, text_tokens, text_mask = self.text(list(_require(batch, "report", "clip/multiview")))
            out["text_embeddings"] = F.normalize(self.text_proj(text_pooled), dim=-1)
            if "multiview" in needed:
                out.update(self._multiview_outputs(batch, out["volume_embeddings"], text_tokens, text_mask))
        if "osl" in needed:
            out.update(self._osl_outputs(batch, out["volume_embeddings"]))
        if "mae" in needed:
            out.update(self._mae_outputs(batch))
        return out

    def _study(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        if "study" in batch:
            return batch["study"].to(self.device), batch.get("study_mask")
        return _require(batch, "volume", "vision").to(self.device), None

    def _single_scans(self, batch: dict[str, Any]) -> Tensor:
        """The batch's real scans as ``[N, 1, D, H, W]`` (MAE and multi-view work per scan)."""
        if "volume" in batch:
            return batch["volume"].to(self.device)
        study, scan_mask = as_study(batch["study"].to(self.device), batch.get("study_mask"))
        return study[scan_mask]

    def _findings_outputs(self, batch: dict[str, Any], pooled: Tensor) -> dict[str, Tensor]:
        labels = _require(batch, "finding_labels", "findings").to(self.device)
        if labels.shape != (pooled.shape[0], len(self.findings)):
            raise ValueError(
                f"finding_labels should have shape {(pooled.shape[0], len(self.findings))} "
                f"(vocabulary {self.cfg.vocabulary!r}), got {tuple(labels.shape)}."
            )
        out = {"findings_logits": self.findings_head(pooled), "finding_labels": labels}
        if batch.get("finding_mask") is not None:
            out["finding_mask"] = batch["finding_mask"].to(self.device)
        return out

    def _decoder_memory(self, vis: VisionOutput, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's cross-attention memory; with ``decoder.findings_prompt``, the findings head's
        probabilities (detached) as prompt tokens too, in training and in generation alike."""
        probs = None
        if self.cfg.decoder.findings_prompt:  # functional on detached weights: no gradient, no DP hook
            head = self.findings_head
            probs = torch.sigmoid(F.linear(pooled.detach(), head.weight.detach(), head.bias.detach()))
        return self.report_decoder.memory(vis.tokens, vis.valid, vis.grid, vis.num_scans, probs)

    def _report_outputs(self, batch: dict[str, Any], vis: VisionOutput, pooled: Tensor) -> dict[str, Tensor]:
        texts = batch.get("report_target") or _require(batch, "report", "report")
        enc = self.tokenize(texts, max_length=self.cfg.decoder.max_length)
        memory, valid = self._decoder_memory(vis, pooled)
        logits = self.report_decoder(memory, valid, enc["input_ids"], enc["attention_mask"])
        labels = self.report_decoder.labels(enc["input_ids"], enc["attention_mask"])
        return {"report_logits": logits, "report_labels": labels}

    def _multiview_outputs(
        self, batch: dict[str, Any], volume_embeddings: Tensor, text_tokens: Tensor, text_mask: Tensor
    ) -> dict[str, Tensor]:
        views = batch.get("views")
        if views is None:
            mv = self.cfg.multiview
            source = batch["volume"] if "volume" in batch else batch["study"][:, 0]  # first scan of a study
            views = random_views(source.to(self.device), mv.num_views, mv.view_size)
        views = views.to(self.device)  # [B, M, 1, d, h, w]
        b, m = views.shape[:2]
        vis = self.vision(views.flatten(0, 1))
        fused = self.view_fusion(
            vis.tokens,
            text_tokens.repeat_interleave(m, dim=0),
            text_mask.repeat_interleave(m, dim=0),
        )
        pooled = self.view_pool(fused, vis.valid)
        emb = F.normalize(self.vision_proj(pooled), dim=-1).reshape(b, m, -1)
        return {"view_embeddings": emb, "view_prototypes": volume_embeddings.detach()}

    def _osl_outputs(self, batch: dict[str, Any], volume_embeddings: Tensor) -> dict[str, Tensor]:
        index = _require(batch, "osl_index", "osl").to(self.device).long()
        positive = list(_require(batch, "osl_positive", "osl"))
        negative = list(_require(batch, "osl_negative", "osl"))
        if not len(positive) == len(negative) == index.numel():
            raise ValueError(
                f"osl_index ({index.numel()}), osl_positive ({len(positive)}) and osl_negative "
                f"({len(negative)}) should have the same length."
            )
        if index.numel() == 0:
            empty = volume_embeddings[:0]
            return {"osl_volume_embeddings": empty, "osl_positive_embeddings": empty, "osl_negative_embeddings": empty}
        sentences = self.encode_text(positive + negative)
        k = index.numel()
        return {
            "osl_volume_embeddings": volume_embeddings[index],
            "osl_positive_embeddings": sentences[:k],
            "osl_negative_embeddings": sentences[k:],
        }

    def _mae_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.cfg.vision.kind != "vit":
            raise ValueError("the 'mae' objective needs vision.kind 'vit'; this model uses a ResNet encoder.")
        scans = self._single_scans(batch)
        noise = batch.get("mae_noise")
        vis = self.vision(scans, mask_ratio=self.cfg.mae.mask_ratio,
                          mask_noise=None if noise is None else noise.to(self.device))
        prediction = self.mae_decoder(vis.tokens, vis.ids_restore, vis.grid)
        return {
            "mae_prediction": prediction,
            "mae_target": patchify(scans, tuple(self.cfg.vision.patch_size)),
            "mae_mask": vis.mask,
        }


def _require(batch: dict[str, Any], key: str, objective: str) -> Any:
    if key not in batch or batch[key] is None:
        raise KeyError(f"batch has no {key!r}, which the {objective!r} objective needs; keys present: {sorted(batch)}.")
    return batch[key]


def build_model(cfg: ModelConfig) -> FoundationModel:
    """Build the foundation model for a config (see :func:`shared_models.load_preset`)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}.")
    return FoundationModel(cfg)
