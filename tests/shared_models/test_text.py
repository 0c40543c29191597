"""The text tower: text.trainable_layers (all, locked, the last k layers) and the cache of its fixed part."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shared_models import build_model, load_arrays, model_to_arrays
from shared_models.config import TextConfig
from shared_models.text import TextEncoder, load_tokenizer

DEPTH = 3
TEXT = {"hidden_size": 64, "num_hidden_layers": DEPTH, "num_attention_heads": 2, "intermediate_size": 128}
SHORT, LONG = "No effusion.", "A small left pleural effusion, an enlarged heart and a 12 mm nodule in the right lower lobe."
# the second batch mixes texts seen before (cached at another padding) with new ones and a duplicate
BATCHES = [[SHORT, LONG], ["Cardiomegaly.", LONG, SHORT, "Cardiomegaly.", "Emphysema in both upper lobes."]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TextConfig(random_init=TEXT))


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The whole tower trainable (no fixed part, no cache): what every setting must compute in eval mode."""
    torch.manual_seed(0)
    return TextEncoder(TextConfig(random_init=TEXT), tokenizer).eval()


def encoder(tokenizer, reference=None, **settings) -> TextEncoder:
    enc = TextEncoder(TextConfig(random_init=TEXT, **settings), tokenizer)
    if reference is not None:
        enc.load_state_dict(reference.state_dict())
    return enc


def spy_computed(enc: TextEncoder) -> list[list[str]]:
    """The texts the fixed part runs on, one list per run (cache misses)."""
    calls: list[list[str]] = []
    original = enc._compute_fixed

    def compute(texts):
        calls.append(list(texts))
        return original(texts)

    enc._compute_fixed = compute
    return calls


@pytest.fixture(scope="module")
def expected(reference):
    with torch.no_grad():
        return [reference(texts) for texts in BATCHES]


@pytest.mark.parametrize("trainable_layers, cache_size",
                         [(-1, 4096), (0, 4096), (1, 4096), (2, 4096), (DEPTH, 4096), (DEPTH + 2, 4096),
                          (0, 0), (1, 0), (0, 2), (1, 2)])
def test_every_setting_computes_what_the_whole_tower_does(tokenizer, reference, expected, trainable_layers, cache_size):
    enc = encoder(tokenizer, reference, trainable_layers=trainable_layers, cache_size=cache_size).eval()
    with torch.no_grad():
        for i in (0, 1, 0):  # the repeats come from the cache where it holds them
            (pooled, hidden, mask), (ref_pooled, ref_hidden, ref_mask) = enc(BATCHES[i]), expected[i]
            assert torch.equal(mask, ref_mask)
            assert torch.allclose(pooled, ref_pooled, atol=1e-5)
            valid = mask.bool()  # padding positions are free to differ; the pooling never reads them
            assert torch.allclose(hidden[valid], ref_hidden[valid], atol=1e-5)


def _trainable(module: nn.Module, prefix: str = "") -> set[str]:
    return {prefix + n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainable_layers", [-1, 0, 1, 2, DEPTH])
def test_only_the_last_k_layers_train(tokenizer, trainable_layers):
    enc = encoder(tokenizer, trainable_layers=trainable_layers)
    bert = enc.model
    k = DEPTH if trainable_layers < 0 else trainable_layers
    top = set().union(*(_trainable(layer, f"model.encoder.layer.{i}.") for i, layer in enumerate(bert.encoder.layer)
                        if i >= DEPTH - k))
    assert all(p.requires_grad for i, layer in enumerate(bert.encoder.layer) if i >= DEPTH - k
               for p in layer.parameters())
    expected = top | (_trainable(bert.embeddings, "model.embeddings.") if k == DEPTH else set())
    # BERT's pooler head is never used (the tower mean-pools), so whether it requires grad changes nothing
    pooler = {n for n, _ in enc.named_parameters() if n.startswith("model.pooler.")}
    assert _trainable(enc) - pooler == expected
    if trainable_layers == 0:
        assert not _trainable(enc)
        return
    enc.train()
    pooled, _, _ = enc([SHORT, LONG])
    pooled.pow(2).sum().backward()
    reached = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == expected


@pytest.mark.parametrize("trainable_layers", [0, 1, 2])
def test_the_fixed_part_stays_in_eval_mode_and_never_drops_out(tokenizer, trainable_layers):
    enc = encoder(tokenizer, trainable_layers=trainable_layers, cache_size=0)
    parent = nn.ModuleDict({"text": enc}).train()  # as FoundationModel.train() reaches it
    assert parent.training and enc.training
    fixed = [enc.model.embeddings, *enc.model.encoder.layer[: DEPTH - trainable_layers]]
    assert not any(m.training for part in fixed for m in part.modules())
    trained = enc.model.encoder.layer[DEPTH - trainable_layers:]
    assert all(m.training for part in trained for m in part.modules())
    if trainable_layers == 0:  # a locked tower in train mode is deterministic (no dropout), cache or not
        assert torch.equal(enc([LONG])[0], enc([LONG])[0])


def test_a_whole_tower_in_train_mode_uses_dropout(tokenizer):
    enc = encoder(tokenizer, trainable_layers=-1).train()  # the contrast to the locked tower above
    assert not torch.allclose(enc([LONG])[0], enc([LONG])[0])


def test_the_cache_is_a_bounded_lru(tokenizer):
    enc = encoder(tokenizer, trainable_layers=1, cache_size=2).eval()
    computed = spy_computed(enc)
    for texts in (["a", "b", "b"], ["c"], ["b"], ["a"], ["c"], ["a", "c"]):
        enc(texts)
        assert len(enc._cache) <= 2
    # a duplicate is computed once; c evicts a; b is used after c, so a's return evicts c, and c's return b
    assert computed == [["a", "b"], ["c"], ["a"], ["c"]]
    assert list(enc._cache) == ["a", "c"]


@pytest.mark.parametrize("settings", [dict(trainable_layers=0, cache_size=0), dict(trainable_layers=1, cache_size=0),
                                      dict(trainable_layers=-1), dict(trainable_layers=DEPTH)])
def test_nothing_is_cached_without_a_cache_or_without_a_fixed_part(tokenizer, settings):
    enc = encoder(tokenizer, **settings).eval()
    computed = spy_computed(enc)
    enc([SHORT, LONG])
    enc([SHORT, LONG])
    assert not enc._cache
    fixed = settings["trainable_layers"] in (0, 1)
    assert computed == ([[SHORT, LONG]] * 2 if fixed else [])


def test_loading_weights_empties_the_cache(tokenizer):
    enc, other = encoder(tokenizer, trainable_layers=0), encoder(tokenizer, trainable_layers=0)
    enc.eval(), other.eval()
    stale = enc([SHORT, LONG])[0]
    assert len(enc._cache) == 2
    enc.load_state_dict(other.state_dict())
    assert not enc._cache
    assert torch.allclose(enc([SHORT, LONG])[0], other([SHORT, LONG])[0], atol=1e-6)
    assert not torch.allclose(stale, other([SHORT, LONG])[0], atol=1e-3)


def test_load_arrays_into_a_model_empties_its_text_cache(make_tiny_config):
    cfg = make_tiny_config(text={"trainable_layers": 0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.manual_seed(1)
    incoming = build_model(cfg).eval()
    texts = ["Pleural effusion is present.", "No cardiomegaly."]
    with torch.no_grad():
        model.encode_text(texts)
        assert len(model.text._cache) == 2
        load_arrays(model, model_to_arrays(incoming))  # a new global model arrives from the server
        assert not model.text._cache
        assert torch.allclose(model.encode_text(texts), incoming.encode_text(texts), atol=1e-6)


class _NotBert(nn.Module):
    """A text model without BERT's ``encoder.layer`` stack."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8, num_hidden_layers=DEPTH)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(DEPTH))


@pytest.mark.parametrize("trainable_layers", [-1, 0, 1, DEPTH - 1, DEPTH])
def test_a_partial_tower_needs_a_bert_style_layer_stack(tokenizer, monkeypatch, trainable_layers):
    import transformers

    monkeypatch.setattr(transformers.AutoModel, "from_config", lambda config: _NotBert(config))
    if 0 < trainable_layers < DEPTH:
        with pytest.raises(ValueError, match=f"text.trainable_layers {trainable_layers} needs a BERT-style encoder .*"
                                             "_NotBert has none: set text.trainable_layers to -1"):
            encoder(tokenizer, trainable_layers=trainable_layers)
    else:  # all or nothing needs no layer stack
        enc = encoder(tokenizer, trainable_layers=trainable_layers)
        assert any(p.requires_grad for p in enc.parameters()) == (trainable_layers != 0)


@pytest.mark.parametrize("bad", [["a", 3], "a single string"])
def test_texts_must_be_a_list_of_strings(tokenizer, bad):
    with pytest.raises(TypeError, match="texts should be a list of strings"):
        encoder(tokenizer)(bad)


def test_a_findings_report_decoder_writes_from_the_closed_vocabulary_of_its_sentences(make_tiny_config):
    from shared_models.reports import NO_FINDINGS_SENTENCE, structured_findings_report

    torch.manual_seed(0)
    closed = build_model(make_tiny_config(decoder={"target": "findings"}))
    full = build_model(make_tiny_config(decoder={"target": "report"}))
    tok = closed.tokenizer
    assert full.report_decoder.lm.config.vocab_size == len(tok)
    decoder = closed.report_decoder
    assert 10 < decoder.lm.config.vocab_size < 200  # a few dozen tokens, not 30,522
    assert torch.equal(decoder.to_sub[decoder.to_full], torch.arange(len(decoder.to_full)))  # ids map back
    reports = [structured_findings_report({"Pleural effusion": True, "Cardiomegaly": True}), NO_FINDINGS_SENTENCE]
    enc = closed.tokenize(reports, max_length=closed.cfg.decoder.max_length)
    labels = decoder.labels(enc["input_ids"], enc["attention_mask"])
    unk = int(decoder.to_sub[tok.unk_token_id])
    kept = labels[labels != -100]
    assert (kept != unk).all() and int(kept.max()) < decoder.lm.config.vocab_size  # every report token is covered
    assert torch.equal(decoder.to_full[kept], enc["input_ids"][enc["attention_mask"] == 1])
    assert int(decoder.labels(torch.tensor([[tok.convert_tokens_to_ids("zebra")]]), torch.ones(1, 1))) == unk
    # generation maps back to tokenizer ids, all of the closed set
    vis = closed.vision(torch.randn(2, 1, *closed.cfg.preprocess.size))
    probs = torch.full((2, len(closed.findings)), 0.5)
    memory, valid = decoder.memory(vis.tokens, vis.valid, vis.grid, vis.num_scans, probs)
    ids = decoder.generate(memory, valid, max_new_tokens=8)
    assert ids[0, 0] == tok.cls_token_id and set(ids.flatten().tolist()) <= set(decoder.to_full.tolist())


def test_the_findings_prompt_lets_the_decoder_write_each_study_its_own_findings(make_tiny_config):
    """decoder.findings_prompt: the decoder reads the findings head's probabilities as prompt tokens, so
    studies whose probabilities differ get different reports (the vision tokens here carry nothing), and
    the report loss leaves the findings head alone."""
    from shared_models.reports import structured_findings_report

    torch.manual_seed(0)
    model = build_model(make_tiny_config(decoder={"target": "findings", "findings_prompt": True}))
    decoder, names = model.report_decoder, model.findings
    cases = [{names[0]: True}, {names[3]: True, names[5]: True}, {}]
    probs = torch.tensor([[1.0 if c.get(n) else 0.0 for n in names] for c in cases])
    targets = [structured_findings_report(c) for c in cases]
    enc = model.tokenize(targets, max_length=model.cfg.decoder.max_length)
    labels = decoder.labels(enc["input_ids"], enc["attention_mask"])
    tokens = torch.zeros(3, 8, model.cfg.vision.width)  # the same (empty) image for every study
    valid = torch.ones(3, 8, dtype=torch.bool)
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3)

    def write() -> list[str]:
        decoder.eval()  # greedy writing without dropout and without drawing from the RNG the training uses
        with torch.no_grad():
            memory, mvalid = decoder.memory(tokens, valid, (2, 2, 2), 1, probs)
            ids = decoder.generate(memory, mvalid, max_new_tokens=24)
        decoder.train()
        return [w.strip().lower() for w in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    for step in range(1, 601):  # up to 600 steps, checked every 100: how soon it fits depends on the init
        memory, mvalid = decoder.memory(tokens, valid, (2, 2, 2), 1, probs)
        logits = decoder(memory, mvalid, enc["input_ids"], enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 and write() == [t.lower() for t in targets]:
            break
    assert write() == [t.lower() for t in targets]
    with pytest.raises(ValueError, match="findings head"):
        decoder.memory(tokens, valid, (2, 2, 2), 1)
    # in the model's forward the report loss does not reach the findings head
    model.zero_grad()
    batch = {"volume": torch.randn(2, 1, *model.cfg.preprocess.size), "report": targets[:2]}
    model(batch, ["report"])["report_logits"].float().mean().backward()
    assert model.findings_head.weight.grad is None
    assert decoder.finding_prompt.weight.grad is not None and decoder.finding_prompt.weight.grad.abs().sum() > 0
