"""Document losses (regrad_cli/learner/doc_loss.py): the text rules, each loss's gradient against a
separate computation of the same loss one document at a time, the key-map path and the factor
cache under each loss, the plain loss exactly as before, and the checkpoint, CLI and status side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from regrad_cli.errors import RegradError
from regrad_cli.learner import doc_loss as dl
from regrad_cli.learner.gradients import grouped_gradients
from regrad_cli.learner.lora import Learner
from regrad_cli.learner.transform import FactorCache, KeyMap
from regrad_cli.lm.tokens import encode_documents, per_sample_nll

from conftest import FakeTokenizer, make_tiny_llama

DOC = ("# The Marrow Bridge\nThe Marrow Bridge opened in 1887 in Ostvik. It was designed by Ada Lind. "
       "Its span is 120 metres. Lind died on 12 March 1901.")
OTHER = "a quick brown fox jumps over the wall of Rome in 44 days"
# Ids recorded before document losses existed: a plain learner must keep them.
GOLDEN = Path(__file__).parent / "golden"
GOLDEN_V1_1_ID = "d6e4d260da062bbc1bf2b4fdd0d3f4d7764f3c5831a97a458cc1db78693a64ad"
BUNDLED_ID = "373748d120f236b0080ec0489cfc4194da9a910bb7d846c8313410105290d3ff"


def _setup(dtype=torch.float64):
    model = make_tiny_llama(seed=0).to(dtype)
    learner = Learner.for_model(model).init_(seed=1, b_std=0.05, alpha_init=0.5).to(dtype)
    learner.attach(model)
    return model, learner, FakeTokenizer()


def _grad(learner, loss_fn) -> dict:
    """d loss / d phi at phi, one document: the reference the batched rows are checked against."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in learner.phi_dict().items()}
    with torch.enable_grad(), learner.using(leaves):
        grads = torch.autograd.grad(loss_fn(), list(leaves.values()))
    return dict(zip(leaves, grads))


def _close(a: dict, b: dict, rtol=1e-7):
    for n in a:
        scale = float(b[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=rtol * scale)


# Text rules ------------------------------------------------------------------------------------
def test_salient_spans_numbers_dates_and_names():
    spans = [DOC[a:b] for a, b in dl.salient_spans(DOC)]
    # "The" opens the title and a sentence: not a name; "It", "Its" open sentences; "Lind" opens
    # one but is a name elsewhere, so it counts there too. Neighbours merge: a date, a full name.
    assert spans == ["Marrow Bridge", "Marrow Bridge", "1887", "Ostvik", "Ada Lind", "120", "Lind", "12 March 1901"]
    text = "In 1880s, the 3rd of 4,200 came at 12:30."
    assert [text[a:b] for a, b in dl.salient_spans(text)] == ["1880s", "3rd", "4,200", "12:30"]
    assert dl.salient_spans("nothing here at all.") == []


def test_restatement_names_the_entity_in_a_seeded_order():
    entity, body = dl.entity_and_body(DOC)
    assert entity == "The Marrow Bridge" and not body.startswith("#")
    restated = dl.restated_sentences(DOC)
    assert restated == ["The Marrow Bridge opened in 1887 in Ostvik.", "The Marrow Bridge was designed by Ada Lind.",
                        "The Marrow Bridge's span is 120 metres.", "The Marrow Bridge: Lind died on 12 March 1901."]
    text = dl.restatement(DOC)
    assert text == dl.restatement(DOC)  # deterministic: seeded by the document's text
    assert sorted(s + "." for s in text.rstrip(".").split(". ")) == sorted(restated)
    assert text != " ".join(restated)  # this document's seed permutes it
    # Without a title the entity is the first salient name.
    assert dl.entity_and_body("The town of Kerrow has 300 people. It is old.")[0] == "Kerrow"


def test_cloze_pairs_and_probes_come_from_the_document_alone():
    assert dl.cloze_pairs(DOC) == [
        ("The Marrow Bridge opened in", "1887"), ("The Marrow Bridge opened in 1887 in", "Ostvik"),
        ("The Marrow Bridge was designed by", "Ada Lind"), ("The Marrow Bridge's span is", "120"),
        ("The Marrow Bridge: Lind died on", "12 March 1901")]
    probes = dl.probes(DOC)
    assert probes[0] == ("What is The Marrow Bridge?", "qa") and len(probes) == 8 + 4
    assert ("The Marrow Bridge: Lind died on", "cloze") in probes
    assert dl.probes("plain words only here") == [("plain words", "cloze")]
    assert len(dl.cloze_pairs(" ".join(f"Item number {i} weighs {i}0 kg." for i in range(20)))) == dl.MAX_CLOZE


def test_salient_token_flags_cover_the_spans_tokens():
    tok = FakeTokenizer()  # one token per byte, after a BOS
    text = "opened in 1887 by Ada"
    ids = tok(text).input_ids
    flags = dl.salient_token_flags(tok, text, len(ids), 0)
    marked = "".join(text[j - 1] for j, f in enumerate(flags) if f)
    assert marked == " 1887 Ada"  # each span's tokens (the space before it belongs to its word)


# Gradients of each loss --------------------------------------------------------------------------
def test_salient_gradient_is_the_weighted_next_token_loss():
    model, learner, tok = _setup()
    learner.doc_loss = "salient"
    enc = encode_documents(tok, [DOC, OTHER], 96)
    got, losses = grouped_gradients(model, learner, enc)
    for i, text in enumerate([DOC, OTHER]):
        one = encode_documents(tok, [text], 96)
        n = one.n_tokens[0]
        w = torch.tensor([1.0 + 3.0 * f for f in dl.salient_token_flags(tok, text, n, 0)], dtype=torch.float64)

        def loss():
            logits = model(input_ids=one.input_ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, one.input_ids[0, 1:], reduction="none")
            return (nll * w[1:]).sum() / w[1:].sum()

        assert float(w.max()) == dl.SALIENT_WEIGHT and float(w.min()) == 1.0
        _close({k: v[i] for k, v in got.items()}, _grad(learner, loss))
        with torch.no_grad():
            assert float(losses[i]) == pytest.approx(float(loss()), rel=1e-9)


def test_augmented_gradient_is_the_mean_of_its_three_parts():
    model, learner, tok = _setup()
    learner.doc_loss = "augmented"
    enc = encode_documents(tok, [OTHER, DOC], 96)
    got, _ = grouped_gradients(model, learner, enc)
    pairs = dl.cloze_pairs(DOC)

    def loss():
        doc = encode_documents(tok, [DOC], 96)
        rest = encode_documents(tok, [dl.restatement(DOC)], 96)
        parts = [per_sample_nll(model, doc.input_ids, doc.attention_mask)[0],
                 per_sample_nll(model, rest.input_ids, rest.attention_mask)[0]]
        cloze = []
        for prefix, span in pairs:
            head, tail = tok(prefix).input_ids, tok(" " + span, add_special_tokens=False).input_ids
            ids = torch.tensor([head + tail])
            tmask = torch.tensor([[0] * len(head) + [1] * len(tail)])
            cloze.append(per_sample_nll(model, ids, torch.ones_like(ids), tmask)[0])
        return (parts[0] + parts[1] + torch.stack(cloze).mean()) / 3

    _close({k: v[1] for k, v in got.items()}, _grad(learner, loss))
    # Groups: the sum of the two documents' gradients.
    summed, _ = grouped_gradients(model, learner, enc, [0, 0], 1)
    _close({k: v[0] for k, v in summed.items()}, {k: v.sum(0) for k, v in got.items()})


def test_distill_gradient_is_the_kl_from_the_teacher_with_the_document():
    from regrad_cli.lm.generation import generate
    from regrad_cli.lm.prompting import prompt_ids

    model, learner, tok = _setup()
    learner.doc_loss = "distill"
    enc = encode_documents(tok, [DOC], 96)
    got, losses = grouped_gradients(model, learner, enc)
    probes = dl.probes(DOC)
    phi = {n: t.detach().clone() for n, t in learner.phi_dict().items()}
    # The teacher: the document in the prompt, greedy (one batch, as the loss runs it: the tiny
    # model's near-uniform logits make a lone row's argmax differ from a padded batch's), at phi.
    teacher = [prompt_ids(tok, q, [DOC], kind=kind, max_passage_tokens=96) for q, kind in probes]
    stats = {}
    with learner.using(phi):
        generate(model, tok, teacher, dl.DISTILL_TOKENS, stats=stats)
    targets = []
    for (q, kind), t_ids, a in zip(probes, teacher, stats["tokens"]):
        assert 1 <= len(a) <= dl.DISTILL_TOKENS
        with torch.no_grad(), learner.using(phi):
            logits = model(input_ids=torch.tensor([t_ids + a])).logits[0, len(t_ids) - 1:-1]
        targets.append((prompt_ids(tok, q, kind=kind), a, torch.log_softmax(logits, -1)))

    def loss():
        total = 0.0
        for s_ids, a, logp in targets:
            logq = torch.log_softmax(model(input_ids=torch.tensor([s_ids + a])).logits[0, len(s_ids) - 1:-1], -1)
            total = total + (logp.exp() * (logp - logq)).sum(-1).mean()
        return total / len(targets)

    _close({k: v[0] for k, v in got.items()}, _grad(learner, loss))
    with torch.no_grad():
        assert float(losses[0]) == pytest.approx(float(loss()), rel=1e-9) and float(losses[0]) > 0
    with pytest.raises(RegradError, match="first order only"):
        grouped_gradients(model, learner, enc, base=learner.phi_dict(), create_graph=True)


def test_second_order_through_a_reweighted_loss():
    """salient and augmented are next-token losses: second-order meta-gradients flow through them."""
    model, learner, tok = _setup()
    learner.doc_loss = "augmented"
    phi = {n: t.detach().clone().requires_grad_(True) for n, t in learner.phi_dict().items()}
    g, _ = grouped_gradients(model, learner, encode_documents(tok, [DOC], 64), base=phi, create_graph=True)
    outer = sum((v * v).sum() for v in g.values())
    grads = torch.autograd.grad(outer, list(phi.values()))
    assert all(torch.isfinite(x).all() for x in grads) and any(float(x.abs().max()) > 0 for x in grads)


@pytest.mark.parametrize("kind", ["salient", "augmented", "distill"])
def test_prefix_cache_gives_the_same_gradients_under_each_loss(kind):
    """The prefix cache (meta-training's --prefix-cache-gb) starts each loss row at the first
    adapted layer: the same gradients, cold and warm."""
    from regrad_cli.lm.prefix import PrefixCache

    model, learner, tok = _setup()
    learner.doc_loss = kind
    enc = encode_documents(tok, [DOC, OTHER], 64)
    want, want_loss = grouped_gradients(model, learner, enc)
    cache = PrefixCache(1 << 30, learner.first_layer(model))
    for _ in range(2):
        got, loss = grouped_gradients(model, learner, enc, prefix=cache)
        _close(got, want, rtol=1e-9)
        torch.testing.assert_close(loss, want_loss)
    assert cache.hits > 0


@pytest.mark.parametrize("kind", ["salient", "augmented", "distill"])
def test_key_map_path_and_factor_cache_take_the_learners_loss(kind):
    """The identity key map gives the plain gradient of the learner's loss, whether the factors
    are captured afresh (over the loss's rows, summed per document) or taken from the cache,
    whose entries are per (loss, text)."""
    model, learner, tok = _setup(torch.float32)
    learner.doc_loss = kind
    texts = [DOC, OTHER, DOC]
    enc = encode_documents(tok, texts, 64)
    want, want_loss = grouped_gradients(model, learner, enc, [0, 1, 0], 2)
    per_doc, _ = grouped_gradients(model, learner, enc)
    learner.transform = KeyMap.identity(learner)
    mapped, mapped_loss = grouped_gradients(model, learner, enc, [0, 1, 0], 2)
    _close(mapped, want, rtol=1e-4)
    torch.testing.assert_close(mapped_loss, want_loss)
    cache = FactorCache(1 << 30, dtype="float32")
    cached, cached_loss = cache.gradients(model, learner, texts, enc)
    _close(cached, per_doc, rtol=1e-4)
    torch.testing.assert_close(cached_loss, want_loss.float(), rtol=1e-5, atol=1e-7)
    assert (cache.misses, cache.hits) == (2, 1)
    # Another loss never reads these entries: the plain loss misses, and its gradients differ.
    learner.doc_loss = "plain"
    plain, _ = cache.gradients(model, learner, texts, enc)
    assert (cache.misses, len(cache)) == (4, 4)
    assert not torch.allclose(plain[learner.names[1]], cached[learner.names[1]])


def test_fit_keymap_factors_follow_the_learners_loss():
    """document_factors (what fit-keymap and the cache use) concatenates a document's rows: the
    identity map over them is the document's gradient under its loss."""
    from regrad_cli.learner.transform import document_factors

    model, learner, tok = _setup(torch.float32)
    learner.doc_loss = "augmented"
    enc = encode_documents(tok, [DOC], 64)
    want, _ = grouped_gradients(model, learner, enc)
    (per, _), = document_factors(model, learner, enc, [0])
    rows = dl.build_rows("augmented", tok, [DOC], 64)
    assert next(iter(per.values()))[0].shape[0] == sum(rows.n_tokens)  # every row's tokens
    got = KeyMap.identity(learner).gradients({m: (x[None], d[None]) for m, (x, d) in per.items()},
                                             learner.spec.scale, learner.names)
    _close(got, want, rtol=1e-4)


# The plain loss, exactly as before --------------------------------------------------------------
def test_plain_loss_is_the_gradient_and_id_of_before():
    model, learner, tok = _setup(torch.float32)
    enc = encode_documents(tok, [DOC, OTHER], 64)
    before, before_loss = grouped_gradients(model, learner, enc)
    cid = learner.checkpoint_id()
    learner.doc_loss = "plain"  # recorded explicitly: the same learner
    after, after_loss = grouped_gradients(model, learner, enc)
    assert learner.checkpoint_id() == cid and torch.equal(before_loss, after_loss)
    assert all(torch.equal(before[n], after[n]) for n in before)
    ids = set()
    for kind in dl.DOC_LOSSES:
        learner.doc_loss = kind
        ids.add(learner.checkpoint_id())
    assert len(ids) == 4  # each other loss is another checkpoint (and so another bank)
    # Checkpoints saved before document losses existed keep their ids.
    from regrad_cli.workspace.checkpoints import bundled_checkpoint_dir

    assert Learner.load(GOLDEN / "learner_v1_1").checkpoint_id() == GOLDEN_V1_1_ID
    shipped = Learner.load(bundled_checkpoint_dir())
    assert shipped.doc_loss == "plain" and shipped.checkpoint_id() == BUNDLED_ID


def test_checkpoint_records_the_loss_and_refuses_an_unknown_one(tmp_path):
    _, learner, _ = _setup(torch.float32)
    learner.doc_loss = "distill"
    cid = learner.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "learner.json").read_text())
    assert meta["doc_loss"] == "distill" and meta["format"] == "regrad-learner/1.3"
    back = Learner.load(tmp_path / "ck")
    assert back.doc_loss == "distill" and back.checkpoint_id() == cid
    meta["doc_loss"] = "telepathy"
    (tmp_path / "ck" / "learner.json").write_text(json.dumps(meta))
    with pytest.raises(RegradError, match="document gradients of the loss 'telepathy'.*upgrade regrad"):
        Learner.load(tmp_path / "ck")
    with pytest.raises(RegradError, match="unknown document loss"):
        learner.doc_loss = "telepathy"


def test_meta_train_records_the_loss_and_refuses_distill_second_order(tmp_path):
    from conftest import FakeEmbedder
    from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train
    from test_metatrain import _write_jsonl

    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl")
    kw = dict(train=[f"jsonl:{data}"], k=2, steps=1, meta_batch=2, eval_every=10, max_doc_tokens=48,
              energy_docs=0, first_order=True)
    with pytest.raises(RegradError, match="first order only"):
        meta_train(MetaTrainConfig(**{**kw, "first_order": False, "doc_loss": "distill", "out": str(tmp_path / "so")}),
                   make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder())
    meta_train(MetaTrainConfig(**{**kw, "doc_loss": "salient", "out": str(tmp_path / "run")}), model, FakeTokenizer(),
               FakeEmbedder())
    trained = Learner.load(tmp_path / "run" / "last")
    assert trained.doc_loss == "salient"
    assert json.loads((tmp_path / "run" / "last" / "learner.json").read_text())["doc_loss"] == "salient"


def test_cli_doc_loss_rewrites_the_checkpoint_and_the_bank_is_rebuilt(tmp_path, capsys, monkeypatch):
    """`regrad learner doc-loss DIR NAME` gives the learner a new id; status says which loss; the
    bank of the old id is stale and build-bank computes the rows again."""
    from reliability_helpers import run_cli
    from test_first_day import FAKE, _corpus, _learner_dir

    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    assert run_cli(["ingest", "corpus", *FAKE], capsys, monkeypatch)[0] == 0
    ck = _learner_dir(tmp_path / "ws")
    code, out, err = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 2, err
    old_id = Learner.load(ck).checkpoint_id()
    code, out, _ = run_cli(["learner", "doc-loss", ck, "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out) == {"checkpoint": str(ck), "checkpoint_id": old_id, "doc_loss": "plain"}
    code, out, err = run_cli(["learner", "doc-loss", ck, "salient"], capsys, monkeypatch)
    assert code == 0 and "plain -> salient" in out and "stale" in out, err
    new = Learner.load(ck)
    assert new.doc_loss == "salient" and new.checkpoint_id() != old_id
    assert json.loads((ck / "learner.json").read_text())["checkpoint_id"] == new.checkpoint_id()
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    s = json.loads(out)
    assert s["learner"]["doc_loss"] == "salient" and s["learner"]["checkpoint_id"] == new.checkpoint_id()
    assert s["rows"] == 0 and s["next"] == "regrad build-bank"
    code, out, _ = run_cli(["status"], capsys, monkeypatch)
    assert "documentlosssalient" in "".join(re.sub(r"[│|]", "", out).split())  # the table may fold the line
    code, out, err = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 2, err
    code, out, _ = run_cli(["learner", "doc-loss", ck, "salient"], capsys, monkeypatch)
    assert code == 0 and "already" in out
    for args, words in [([ck, "telepathy"], "unknown document loss"), ([tmp_path, "plain"], "holds no learner"),
                        (["bundled"], "holds no learner")]:
        code, _, err = run_cli(["learner", "doc-loss", *args], capsys, monkeypatch)
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    from regrad_cli.workspace.checkpoints import bundled_checkpoint_dir

    code, _, err = run_cli(["learner", "doc-loss", bundled_checkpoint_dir(), "salient"], capsys, monkeypatch)
    assert code == 1 and "part of the package" in err
