"""Which modules of a model carry a LoRA side path: a table per model family, or explicit patterns.

Whole-model surgery only (peft's ``tuners/lora/model.py``); the per-layer maths is ``lora.LoRALinear``.
A target is named either

* by **short names** inside a decoder block plus a layer selection: the module of block ``i`` whose
  name relative to the block is the short name or ends with ``.<short name>`` (so ``"c_proj"`` would
  be ambiguous in GPT-2, where attention and MLP both have one, and the table says ``"mlp.c_proj"``);
  the short names come from ``[lora] modules`` or, when that is empty, from ``FAMILY_TARGETS`` by
  ``model.config.model_type``;
* or by **patterns** (``[lora] target_patterns``): regular expressions matched in full against
  module names (``model.layers.1[0-9].mlp.down_proj``), which replace the layer selection.

Every target is an ``nn.Linear`` (weight [out, in]) or a transformers ``Conv1D`` (GPT-2 family,
weight [in, out]).
"""

from __future__ import annotations

import re

from torch import nn

from regrad_cli.errors import RegradError

# The MLP projections of each family: where the method keeps document knowledge (method.md §1.1).
# Short names are matched inside one decoder block; a dotted name disambiguates.
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    **{family: ("gate_proj", "up_proj", "down_proj") for family in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
        "granite", "smollm3", "cohere", "stablelm", "deepseek_v2", "internlm2", "exaone")},
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
    "gpt_bigcode": ("mlp.c_fc", "mlp.c_proj"),
    "starcoder2": ("mlp.c_fc", "mlp.c_proj"),
    "phi": ("mlp.fc1", "mlp.fc2"),
    "phi3": ("mlp.gate_up_proj", "mlp.down_proj"),
    "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "falcon": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "bloom": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "opt": ("fc1", "fc2"),
    "gptj": ("mlp.fc_in", "mlp.fc_out"),
    "codegen": ("mlp.fc_in", "mlp.fc_out"),
}

OPTION_HINT = ("set [lora] modules (short module names inside a decoder block, e.g. "
               "[\"mlp.fc1\", \"mlp.fc2\"]) or [lora] target_patterns (regular expressions over "
               "full module names) in regrad.toml")

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def _config_int(config, keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise RegradError(f"cannot read the {what} from the model's config (looked for {', '.join(keys)})")


def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks, from the config whatever the family calls it."""
    return _config_int(model.config, _LAYER_COUNT_KEYS, "number of layers")


def hidden_size(model: nn.Module) -> int:
    return _config_int(model.config, _HIDDEN_KEYS, "hidden size")


def family(model: nn.Module) -> str:
    return str(getattr(model.config, "model_type", "") or "")


def family_modules(model: nn.Module) -> list[str]:
    """The table's short names for this model's family; a RegradError naming the option if none."""
    fam = family(model)
    if fam not in FAMILY_TARGETS:
        raise RegradError(f"no LoRA target table for model family {fam or '(unknown)'!r}: {OPTION_HINT}")
    return list(FAMILY_TARGETS[fam])


def conv1d_type():
    """transformers' Conv1D (GPT-2 family), or None where transformers lacks it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a target; a RegradError for anything that is not Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv = conv1d_type()
    if conv is not None and isinstance(module, conv):
        n_in, n_out = module.weight.shape  # Conv1D stores its weight as [in, out]
        return int(n_in), int(n_out)
    raise RegradError(f"a {type(module).__name__} cannot carry a LoRA side path (only Linear and Conv1D)")


def decoder_blocks(model: nn.Module) -> str:
    """Name of the ModuleList holding the decoder blocks (``model.layers``, ``transformer.h``...)."""
    count = n_layers(model)
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == count and name]
    if len(found) > 1:
        # Families with extra lists of the same length (e.g. per-layer norms) keep their blocks in
        # the list whose children hold the most parameters.
        found.sort(key=lambda n: -sum(p.numel() for p in model.get_submodule(n).parameters()))
    if not found:
        raise RegradError(f"cannot find the {count} decoder blocks of this model: {OPTION_HINT}")
    return found[0]


def _unwrap(module: nn.Module) -> nn.Module:
    # A module that already carries a side path is found through its wrapper.
    return getattr(module, "base", module) if type(module).__name__ == "LoRALinear" else module


def find_targets(model: nn.Module, layers: list[int], modules: list[str],
                 patterns: list[str] | None = None) -> list[str]:
    """Full names of the target modules: by patterns if any, else ``modules`` in ``layers``.

    Order: model order for patterns; layer, then the order of ``modules``, otherwise (a learner's
    tensor order, hence its checkpoint id, follows it)."""
    named = dict(model.named_modules())
    if patterns:
        try:
            compiled = [re.compile(p) for p in patterns]
        except re.error as exc:
            raise RegradError(f"[lora] target_patterns: bad regular expression ({exc})") from exc
        names = [n for n in named if any(c.fullmatch(n) for c in compiled)]
        # A wrapper's inner module ('...down_proj.base') is not a target of its own.
        names = [n for n in names if not (n.endswith(".base") and n[:-5] in names)]
        if not names:
            raise RegradError(f"[lora] target_patterns {patterns} match no module of this "
                              f"{family(model) or 'model'} model")
    else:
        if not modules:
            modules = family_modules(model)
        blocks = decoder_blocks(model)
        names = []
        for layer in layers:
            prefix = f"{blocks}.{layer}."
            inside = [n[len(prefix):] for n in named if n.startswith(prefix)]
            for mod in modules:
                hits = [rel for rel in inside if rel == mod or rel.endswith("." + mod)]
                hits = [rel for rel in hits if not rel.endswith(".base")]
                if len(hits) != 1:
                    what = "no" if not hits else f"{len(hits)} ({', '.join(hits)})"
                    raise RegradError(f"{what} module named {mod!r} in layer {layer} ({prefix[:-1]}) of this "
                                      f"{family(model) or 'model'} model: {OPTION_HINT}")
                names.append(prefix + hits[0])
    for n in names:
        in_out_features(_unwrap(named[n]))  # refuses a target that is not Linear or Conv1D
    return names


def first_block(model: nn.Module, names: list[str]) -> int:
    """Index of the lowest decoder block holding one of ``names`` (full module names): every
    block below it runs without a side path. 0 when a name lies outside the blocks."""
    prefix = decoder_blocks(model) + "."
    found = []
    for name in names:
        head = name[len(prefix):].split(".")[0] if name.startswith(prefix) else ""
        if not head.isdigit():
            return 0
        found.append(int(head))
    return min(found) if found else 0
