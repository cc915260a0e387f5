"""Tiny stand-ins behind the ``fake:`` ids: random models of several families and a hashing embedder.

``--model fake:gpt2`` (or ``fake:llama``, ``fake:gpt_neox``, ``fake:opt``, ``fake:phi``,
``fake:qwen2``) loads a randomly initialised model of that family, a few thousand parameters, built
from its config with a fixed seed, and a byte-level tokenizer; ``--embedder fake:hash-32`` is a
deterministic bag-of-words hashing embedder of dimension 32. They exercise every piece of plumbing
(tests, docs examples, a quick look at the CLI) in seconds and offline; their answers mean nothing.
"""

from __future__ import annotations

import hashlib

# Specials first, then one token per byte (GPT-2's byte-level alphabet).
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
BYTE_VOCAB = len(SPECIALS) + 256


def _configs(vocab: int, n_layers: int) -> dict:
    import transformers as T

    common = dict(vocab_size=vocab, num_hidden_layers=n_layers, num_attention_heads=4)
    return {
        "llama": lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=True, **common),
        "qwen2": lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=True, **common),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=n_layers, n_head=4,
                                     n_positions=512, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=512,
                                            bos_token_id=1, eos_token_id=2, **common),
        "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **common),
        "phi": lambda: T.PhiConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, **common),
    }


FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox", "opt", "phi")


def tiny_model(family: str = "llama", *, seed: int = 0, n_layers: int = 4, vocab: int = BYTE_VOCAB):
    """A randomly initialised causal LM of ``family`` (eval mode, frozen), the same for a seed."""
    import torch
    from transformers import AutoModelForCausalLM

    from regrad_cli.errors import ModelLoadError

    configs = _configs(vocab, n_layers)
    if family not in configs:
        raise ModelLoadError(f"no fake model of family {family!r} (use one of {', '.join(FAMILIES)})")
    config = configs[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def byte_tokenizer():
    """A real PreTrainedTokenizerFast (offsets, save_pretrained) with one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _note_load(what: str) -> None:
    """Append one line to the file named by $REGRAD_FAKE_LOAD_LOG, when set: tests read it to
    check that a command loaded no model."""
    import os

    log_path = os.environ.get("REGRAD_FAKE_LOAD_LOG")
    if log_path:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(what + "\n")


def load_fake_model(name: str):
    """(model, tokenizer) for ``fake:<family>``."""
    _note_load(f"model fake:{name}")
    return tiny_model(name or "llama"), byte_tokenizer()


class HashEncoder:
    """Bag-of-words hashing "sentence encoder" with SentenceTransformer's encode signature."""

    def __init__(self, dim: int = 32):
        self.dim = dim

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, normalize_embeddings=True, **_):
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
            n = np.linalg.norm(out[i])
            if n:
                out[i] /= n
            else:
                out[i, 0] = 1.0
        return out


MAX_FAKE_DIM = 4096


def load_fake_encoder(name: str) -> HashEncoder:
    """``fake:hash-<dim>`` (default dimension 32)."""
    from regrad_cli.errors import ModelLoadError

    _note_load(f"embedder fake:{name}")
    kind, _, dim = (name or "hash-32").partition("-")
    dim = dim or "32"
    # Bounded like a real embedder's width: a config naming fake:hash-999999999 must not make
    # every chunk's vector gigabytes.
    if kind != "hash" or not (dim.isdigit() and len(dim) <= 4 and 1 <= int(dim) <= MAX_FAKE_DIM):
        raise ModelLoadError(f"unknown fake embedder {name[:40]!r} (use fake:hash-32, or another dimension "
                             f"from 1 to {MAX_FAKE_DIM})")
    return HashEncoder(int(dim))
