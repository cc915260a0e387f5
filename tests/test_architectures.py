"""The learner on tiny random models of several families (targets by table, GPT-2's Conv1D).

For each family: the targets are the table's MLP projections; the side-path gradient equals the
gradient through explicitly merged weights W + delta_weight(A, B); restoring is exact; and the
whole `regrad ingest -> build-bank -> query` runs through the CLI with `--model DIR`.
"""

from __future__ import annotations

import json

import pytest
import torch

from regrad_cli.workspace.checkpoints import init_learner
from regrad_cli.errors import RegradError
from regrad_cli.lm.fakes import byte_tokenizer, tiny_model
from regrad_cli.learner.gradients import grouped_gradients
from regrad_cli.lm.tokens import encode_documents, per_sample_nll
from regrad_cli.learner.lora import Learner, LoRALinear
from regrad_cli.learner.targets import FAMILY_TARGETS, in_out_features
from reliability_helpers import run_cli

FAMILIES = ["llama", "gpt2", "gpt_neox", "opt", "phi", "qwen2"]
TEXTS = ["the quick brown fox jumps over", "lorem ipsum dolor sit amet"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _attached(family, **kw):
    model = tiny_model(family)
    learner = init_learner(model, None, init_b_std=0.05, alpha_init=1.0, seed=1, **kw)
    return model, learner.attach(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_follow_the_family_table(family):
    model, learner = _attached(family)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    table = FAMILY_TARGETS[family]
    # Upper half of 4 layers, every table entry in each, in layer-then-table order.
    assert len(wrapped) == 2 * len(table)
    assert [n for n in learner.names if n.endswith(".A")] == [n + ".A" for n in wrapped]
    for i, name in enumerate(wrapped):
        assert name.endswith("." + table[i % len(table)])
        assert (".2." in name) if i < len(table) else (".3." in name)
    if family == "gpt2":
        assert all(m.transposed for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("family", FAMILIES)
def test_side_path_gradient_equals_merged_weight_gradient(family, tokenizer):
    model, learner = _attached(family)
    docs = encode_documents(tokenizer, TEXTS)
    grads, _ = grouped_gradients(model, learner, docs)

    # The same losses through merged weights W' = W + delta_weight(A, B), differentiated by hand.
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with learner.disabled():
        leaves, originals = {}, {}
        for name, w in wrappers.items():
            A = learner.tensor(name + ".A").detach().clone().requires_grad_(True)
            B = learner.tensor(name + ".B").detach().clone().requires_grad_(True)
            leaves[name] = (A, B)
            originals[name] = w.base.weight
            del w.base.weight
            w.base.weight = originals[name] + w.delta_weight(A, B)
        try:
            with torch.enable_grad():
                losses = per_sample_nll(model, docs.input_ids, docs.attention_mask)
                for i in range(len(TEXTS)):
                    flat = [t for pair in leaves.values() for t in pair]
                    merged = torch.autograd.grad(losses[i], flat, retain_graph=True)
                    for (name, _), gA, gB in zip(leaves.items(), merged[0::2], merged[1::2]):
                        torch.testing.assert_close(grads[name + ".A"][i], gA, rtol=1e-4, atol=1e-6)
                        torch.testing.assert_close(grads[name + ".B"][i], gB, rtol=1e-4, atol=1e-6)
        finally:
            for name, w in wrappers.items():
                del w.base.weight
                w.base.weight = originals[name]
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_is_exact(family, tokenizer):
    model = tiny_model(family)
    ids = encode_documents(tokenizer, TEXTS[:1]).input_ids
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    learner = init_learner(model, None, init_b_std=0.05, alpha_init=1.0).attach(model)
    assert [id(p) for p in model.parameters()] == params  # wrapped, not copied; phi is not in it
    with torch.no_grad():
        with_phi = model(input_ids=ids).logits
        step = {n: t + 0.5 for n, t in learner.phi_dict().items()}
        with learner.using(step):
            stepped = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.equal(stepped, with_phi)
    assert torch.equal(after, with_phi)
    learner.detach_from(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bare)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_conv1d_delta_is_in_the_base_layout():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc
    n_in, n_out = in_out_features(conv)
    assert tuple(conv.weight.shape) == (n_in, n_out)
    wrapper = LoRALinear(conv, scale=2.0)
    A, B = torch.randn(3, n_in), torch.randn(n_out, 3)
    wrapper.set_active(A, B)
    x = torch.randn(2, 5, n_in)
    merged = x @ (conv.weight + wrapper.delta_weight(A, B)) + conv.bias
    torch.testing.assert_close(wrapper(x), merged, rtol=1e-5, atol=1e-5)


def test_unknown_family_names_the_option():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(RegradError, match=r"\[lora\] modules.*\[lora\] target_patterns"):
        Learner.for_model(model)
    # Either option makes it work.
    explicit = Learner.for_model(model, modules=["mlp.down_proj"], layers="all")
    assert [n for n in explicit.names if n.endswith(".A")] == [
        f"model.layers.{i}.mlp.down_proj.A" for i in range(4)]
    patterned = Learner.for_model(model, target_patterns=[r"model\.layers\.[13]\.self_attn\.o_proj"])
    assert [n for n in patterned.names if n.endswith(".A")] == [
        "model.layers.1.self_attn.o_proj.A", "model.layers.3.self_attn.o_proj.A"]


def test_ambiguous_or_missing_module_is_a_clear_error():
    model = tiny_model("gpt2")
    with pytest.raises(RegradError, match="2 .*c_proj.*target_patterns"):
        Learner.for_model(model, modules=["c_proj"])  # attention and MLP both have one
    with pytest.raises(RegradError, match="no module named 'gate_proj'"):
        Learner.for_model(model, modules=["gate_proj"])
    with pytest.raises(RegradError, match="match no module"):
        Learner.for_model(model, target_patterns=["nothing.*here"])


def test_layer_count_read_generically():
    for family in ("gpt2", "opt", "gpt_neox"):
        learner = Learner.for_model(tiny_model(family), layers="all")
        assert learner.spec.layers == [0, 1, 2, 3]


def test_learner_patterns_persist_and_keep_old_ids(tmp_path):
    model = tiny_model("opt")
    learner = Learner.for_model(model, target_patterns=[r".*layers\.0\.fc1"]).init_(seed=2)
    cid = learner.save(tmp_path / "ck")
    again = Learner.load(tmp_path / "ck")
    assert again.spec.target_patterns == [r".*layers\.0\.fc1"] and again.checkpoint_id() == cid
    # A learner without patterns records and hashes its spec exactly as format 1.0 did.
    plain = Learner.for_model(model).init_(seed=2)
    assert "target_patterns" not in plain.spec.to_dict()


# The CLI, end to end, with --model DIR -------------------------------------------------------
CORPUS = {
    "a.txt": "the zarn river flows past kelb mill every spring and floods the meadow",
    "b.txt": "vesper moths have blue wings and live in the dunmoor hills near the coast",
    "c.txt": "tollvane cheese is aged in limestone caves for nine months before sale",
}


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt"])
def test_cli_ingest_build_query_with_model_dir(family, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / f"tiny-{family}"
    tiny_model(family).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text)
    ws = ["--workspace", tmp_path / "ws"]

    code, out, err = run_cli(["ingest", corpus, "--model", model_dir, "--embedder", "fake:hash-32",
                              "--chunk-tokens", "128", "--json", *ws], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["documents"] == 3
    code, out, err = run_cli(["build-bank", "--json", *ws], capsys, monkeypatch)
    assert code == 0, err
    built = json.loads(out)
    assert built["built"] == built["rows"] == 3 and built["failed"] == []
    code, out, err = run_cli(["query", "what do vesper moths look like?", "--json", "--top-k", "2",
                              "--max-new-tokens", "4", *ws], capsys, monkeypatch)
    assert code == 0, err
    res = json.loads(out)
    assert isinstance(res["answer"], str)
    assert res["retrieved"][0]["doc_id"] == "corpus/b.txt#0"
    assert all(r["applied"] for r in res["retrieved"])
    assert res["bank"]["model"]["id"] == str(model_dir)
    code, out, err = run_cli(["bank", "stats", "--json", *ws], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["lora"]["modules"] == list(FAMILY_TARGETS[family])


def test_checkpoint_of_another_family_is_refused(tmp_path):
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.engine import Engine

    Learner.for_model(tiny_model("llama")).init_(seed=0).save(tmp_path / "ck")
    ws = Workspace.open(tmp_path / "ws", overrides={"model.id": "fake:gpt2",
                                                     "learner.checkpoint": str(tmp_path / "ck")})
    with pytest.raises(RegradError, match="does not fit model fake:gpt2.*gate_proj"):
        Engine.load(ws)
    # The fake: ids reach the same loader as any model id.
    engine = Engine.load(ws, checkpoint="init")
    assert engine.learner.spec.modules == ["mlp.c_fc", "mlp.c_proj"]


def test_init_learner_reads_lora_and_sizes_by_model():
    from regrad_cli.workspace.config import LoraConfig
    from regrad_cli.learner.lora import default_lora

    model = tiny_model("phi")
    auto = init_learner(model, LoraConfig())
    assert (auto.spec.rank, auto.spec.lora_alpha) == default_lora(4, 32)
    cfg = LoraConfig(rank=2, layers="all", modules=["mlp.fc2"], seed=7)
    learner = init_learner(model, cfg, alpha_init=0.5, seed=None)  # None: keep the config's
    assert learner.spec.rank == 2 and learner.spec.layers == [0, 1, 2, 3]
    assert learner.names == [f"model.layers.{i}.mlp.fc2.{t}" for i in range(4) for t in "AB"]
    assert float(learner.alpha(learner.names[0]).detach()) == pytest.approx(0.5)
    assert learner.checkpoint_id() == init_learner(model, cfg, alpha_init=0.5).checkpoint_id()


def test_fake_ids_enter_through_the_model_registry():
    from regrad_cli.errors import ModelLoadError
    from regrad_cli.lm.models import Embedder, load_language_model, load_tokenizer

    lm = load_language_model("fake:gpt_neox")
    assert lm.model.config.model_type == "gpt_neox" and lm.fingerprint["id"] == "fake:gpt_neox"
    assert load_tokenizer("fake:gpt_neox")("abc", add_special_tokens=False).input_ids == lm.tokenizer(
        "abc", add_special_tokens=False).input_ids
    emb = Embedder("fake:hash-16")
    vecs = emb.embed(["a b", "a b", "c"])
    assert emb.fingerprint == {"id": "fake:hash-16", "dim": 16} and (vecs[0] == vecs[1]).all()
    with pytest.raises(ModelLoadError, match="no fake model of family 'nope'"):
        load_language_model("fake:nope")
    with pytest.raises(ModelLoadError, match="fake:hash-32"):
        Embedder("fake:bad").dim


@pytest.mark.parametrize("family", FAMILIES)
def test_cpt_mlp_trains_the_family_mlp_projections(family, tokenizer):
    # CPT's "mlp" set comes from the family table, not from a name test (OPT's fc1/fc2 are not
    # under a module called mlp): every layer's projections, weights and biases, nothing else.
    from regrad_cli.learning.cpt import ContinualPretrainer, CPTConfig

    model = tiny_model(family)
    cpt = ContinualPretrainer(model, tokenizer, CPTConfig(params="mlp", epochs=1))
    trained = {n for n, p in cpt.model.named_parameters() if p.requires_grad}
    table = FAMILY_TARGETS[family]
    assert trained and cpt.n_trainable == sum(p.numel() for n, p in cpt.model.named_parameters() if n in trained)
    for name in trained:
        assert name.rsplit(".", 1)[0].endswith(table), name
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    weights = [n for n in trained if n.endswith(".weight")]
    assert len(weights) == n_layers * len(table)


def test_meta_training_starts_from_the_init_learner():
    # One default: the untrained 'init' learner ([lora]) is exactly meta-training's starting point.
    from regrad_cli.workspace.config import LoraConfig
    from regrad_cli.learning.metatrain import MetaTrainConfig

    assert MetaTrainConfig().alpha_init == LoraConfig().alpha_init
    assert MetaTrainConfig().b_std == LoraConfig().init_b_std
