"""Hidden states below the first adapted layer, cached per token row.

Nothing below the first decoder layer that carries a side path depends on phi: for a given text,
the hidden state entering that layer is the same at every meta-step. ``PrefixCache`` keeps it per
row of token ids (the row's real tokens, exactly, as the key) and ``last_hidden`` runs only the
layers from there up. It gives the decoder's own final hidden states, within float rounding
(tests/test_prefix_cache.py), for the families in ``FAMILIES``: their transformers 5.x decoders
all run embed -> causal mask(s) -> rotary embeddings -> layers -> norm (modeling_llama.py and its
copies), so the upper layers are called here exactly as the decoder calls them.

Exact only for right-padded (or unpadded) rows: positions are then 0..T-1 whatever the batch's
width, and padding never reaches a real token (it is masked as a key, and never scored). Other
families, left-padded batches, autocast and a first layer of 0 get None: the caller runs the full
forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from regrad_cli.errors import RegradError

log = logging.getLogger("regrad")

# Family -> how its decoder builds attention masks (read in each family's modeling file):
# "causal": one causal mask for every layer; "window": mistral and phi3, a sliding-window mask
# when config.sliding_window is set; "layer_types": one mask per kind in config.layer_types.
FAMILIES = {"llama": "causal", "olmo": "causal", "olmo2": "causal", "mistral": "window", "phi3": "window",
            "qwen2": "layer_types", "qwen3": "layer_types", "smollm3": "layer_types"}


def _masks(dec, style: str, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> list:
    """Each layer's attention mask, built as the family's decoder builds it (no KV cache)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = dec.config
    kw = dict(config=cfg, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=pos)
    if style == "causal":
        return [create_causal_mask(**kw)] * cfg.num_hidden_layers
    if style == "window":
        make = create_causal_mask if cfg.sliding_window is None else create_sliding_window_causal_mask
        return [make(**kw)] * cfg.num_hidden_layers
    by_type = {"full_attention": create_causal_mask(**kw)}
    if getattr(dec, "has_sliding_layers", False):
        by_type["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return [by_type[t] for t in cfg.layer_types]


def run_layers(dec, style: str, hidden: torch.Tensor, mask: torch.Tensor, layers: range) -> torch.Tensor:
    """``hidden`` [N, T, H] through decoder layers ``layers``, each called as the decoder's own
    forward calls it (positions 0..T-1, no KV cache)."""
    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    masks = _masks(dec, style, hidden, mask, pos)
    rope = dec.rotary_emb(hidden, position_ids=pos)
    for i in layers:
        hidden = dec.layers[i](hidden, attention_mask=masks[i], position_embeddings=rope, position_ids=pos,
                               cache=None, use_cache=False)
    return hidden


def right_padded_lengths(mask: torch.Tensor) -> list[int] | None:
    """Each row's number of tokens when every row is its tokens then padding; None otherwise."""
    lengths = mask.sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return lengths.tolist() if torch.equal(mask.bool(), expected) else None


class PrefixCache:
    """Per token row, the hidden state entering decoder layer ``first_layer`` (float32 as the
    model computes it, trimmed to the row's tokens), up to ``max_bytes`` (least recently used out
    first). The key is the row's token ids themselves, so different texts never share an entry.
    Valid for one model whose layers below ``first_layer`` do not change (frozen base weights, no
    side path there): the cache binds itself to the first model it serves and refuses another."""

    def __init__(self, max_bytes: int, first_layer: int):
        self.max_bytes, self.first_layer = int(max_bytes), int(first_layer)
        self._rows: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._model = None
        self._noted: set[str] = set()

    def __len__(self) -> int:
        return len(self._rows)

    def _decoder(self, model):
        """The model's decoder if this cache can start inside it; None (noted once) if not."""
        fam = str(getattr(model.config, "model_type", "") or "")
        dec = getattr(model, "model", None)
        parts = ("embed_tokens", "layers", "rotary_emb", "norm")
        if fam in FAMILIES and self.first_layer > 0 and all(hasattr(dec, p) for p in parts):
            if self._model is None:
                self._model = model
            elif self._model is not model:
                raise RegradError("a prefix cache holds one model's hidden states: make one per model")
            return dec
        if fam not in self._noted:
            self._noted.add(fam)
            why = "no adapted layer above the first" if self.first_layer <= 0 else f"family {fam or '?'!r}"
            log.info("prefix cache: %s has no layer-skipping forward here; full forward", why)
        return None

    def last_hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The decoder's final hidden states [N, T, H] (after its norm) for a right-padded batch,
        lower layers from the cache; None where the caller must run the full forward."""
        dec = self._decoder(model)
        if dec is None or torch.is_autocast_enabled(input_ids.device.type):
            return None
        lengths = right_padded_lengths(attention_mask)
        if lengths is None:
            return None
        style = FAMILIES[model.config.model_type]
        start = self._start(dec, style, input_ids, lengths)
        hidden = run_layers(dec, style, start, attention_mask, range(self.first_layer, len(dec.layers)))
        return dec.norm(hidden)

    def _start(self, dec, style: str, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """[N, T, H] hidden states entering ``first_layer``: cached rows, the missing ones
        computed in one batch (no graph: nothing there depends on phi); zeros at padding."""
        host = ids.cpu().numpy()
        keys = [host[i, :n].tobytes() for i, n in enumerate(lengths)]
        found: dict[bytes, torch.Tensor] = {}
        for k in keys:
            if k in self._rows:
                self._rows.move_to_end(k)
                found[k] = self._rows[k]
        first_row = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
        self.misses += len(first_row)
        self.hits += len(keys) - len(first_row)
        if first_row:
            rows = list(first_row.values())
            width = max(lengths[r] for r in rows)
            sub_mask = (torch.arange(width, device=ids.device)[None, :]
                        < torch.tensor([lengths[r] for r in rows], device=ids.device)[:, None]).long()
            with torch.no_grad():
                h = run_layers(dec, style, dec.embed_tokens(ids[rows, :width]), sub_mask, range(self.first_layer))
            for (k, r), row in zip(first_row.items(), h):
                found[k] = row[: lengths[r]].clone()  # its own storage, not a view of the batch
                self._put(k, found[k])
        sample = next(iter(found.values()))
        out = sample.new_zeros(len(keys), ids.shape[1], sample.shape[-1])
        for i, (k, n) in enumerate(zip(keys, lengths)):
            out[i, :n] = found[k]
        return out

    def _put(self, key: bytes, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size() + len(key)
        if size > self.max_bytes:
            return
        while self._rows and self.bytes + size > self.max_bytes:
            old_key, old = self._rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size() + len(old_key)
        self._rows[key] = hidden
        self.bytes += size
