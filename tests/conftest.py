"""Shared fixtures: user state in tmp dirs, a tiny random Llama, a deterministic fake embedder.

The same fakes reach the CLI through ids (regrad_cli/lm/fakes.py): ``--model fake:llama`` (or
fake:gpt2, fake:gpt_neox, ...) and ``--embedder fake:hash-32``; prefer them to monkeypatching.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DIR = REPO / "regrad_cli" / "data" / "demo"


@pytest.fixture(autouse=True)
def _isolated_user_state(tmp_path, monkeypatch):
    """Every test gets its own workspace; the converted-model cache stays shared (it is keyed by
    the GGUF's sha256 and written atomically, so sharing it is safe and saves 20 s per test)."""
    monkeypatch.setenv("REGRAD_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    yield


def require_shared_data():
    if not SHARED_DATA.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


def make_tiny_llama(seed: int = 0, n_layers: int = 4, vocab: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FakeTokenizer:
    """Byte-level tokenizer for the tiny model: deterministic, no files."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    unk_token_id = 3
    eos_token = "</s>"
    pad_token = "<pad>"

    def __init__(self, vocab: int = 64):
        self.vocab = vocab

    def _ids(self, text):
        return [4 + (b % (self.vocab - 4)) for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens=True):
        class _Enc:
            pass

        enc = _Enc()
        enc.input_ids = ([self.bos_token_id] if add_special_tokens else []) + self._ids(text)
        return enc

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        out = []
        for i in ids:
            i = int(i)
            if i < 4:
                if not skip_special_tokens:
                    out.append("")
                continue
            out.append(chr(ord("a") + (i - 4) % 26) if (i - 4) % 13 else "\n")
        return "".join(out)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r, skip_special_tokens) for r in rows]


class FakeEmbedder:
    """Deterministic bag-of-words hashing embedder: ``--embedder fake:hash-DIM`` (regrad_cli/lm/fakes.py)
    as an object, for tests that call the core directly."""

    name = "fake-embedder"
    model_id = "fake-embedder"

    def __init__(self, dim: int = 32):
        self.dim_ = dim

    @property
    def dim(self):
        return self.dim_

    @property
    def fingerprint(self):
        return {"id": self.name, "dim": self.dim_}

    def embed(self, texts):
        from regrad_cli.lm.fakes import HashEncoder

        return HashEncoder(self.dim_).encode(list(texts))


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def fake_tokenizer():
    return FakeTokenizer()


@pytest.fixture
def fake_embedder():
    return FakeEmbedder()


def make_tiny_engine(learner_seed: int = 0, *, alpha_init: float = 1.0, b_std: float = 0.05,
                     hash_weights: bool = False):
    """The tiny Llama (seed 0) with a seeded, non-zero learner attached, as an Engine: the one
    fixture behind the query, eval, energy, serve and reliability tests. ``hash_weights`` records
    the real sha256 of the base weights in the fingerprint (eval's drift check reads it)."""
    from regrad_cli.workspace.engine import Engine
    from regrad_cli.learner.lora import Learner
    from regrad_cli.lm.models import LoadedModel, weights_sha256

    model = make_tiny_llama(seed=0)
    learner = Learner.for_model(model).init_(seed=learner_seed, b_std=b_std, alpha_init=alpha_init)
    learner.attach(model)
    sha = weights_sha256(model) if hash_weights else "tiny"
    lm = LoadedModel(model, FakeTokenizer(), {"id": "tiny-llama", "weights_sha256": sha}, "cpu", "float32")
    return Engine(lm, learner, "tiny-llama")


def param_hash(engine) -> str:
    """sha256 over every base weight and every learner tensor: the no-drift check."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(engine.model.state_dict().items()):
        h.update(name.encode() + t.numpy().tobytes())
    for name, t in sorted(engine.learner.state_dict().items()):
        h.update(name.encode() + t.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: a tiny model is fastest so, and many times slower with
    two on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
