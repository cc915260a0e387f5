"""The learner: a LoRA side path on the model's MLPs, plus one learned step size per LoRA tensor.

Three parts, peft-style: the per-layer maths (``LoRALinear``, here), which modules get a side
path (``regrad_cli.learner.targets``: a table per model family, or explicit patterns) and persistence
(``regrad_cli.learner.persistence``: the checkpoint files, versioned, with named migrations). The base
weights are never modified: each target ``nn.Linear`` (or GPT-2's ``Conv1D``) is wrapped by
``LoRALinear``, whose output is ``base(x) + s * (x A^T) B^T``. The tensors (A, B) the side path
uses are *active weights* set by the learner: normally phi itself, temporarily
phi' = phi - gamma * alpha * g during a query, or a per-sample stack [N, ...] during batched
gradient computation and meta-training. Because phi is never written to, restoring after a query
is exact by construction: the active weights simply point back at phi.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from regrad_cli.learner import targets
from regrad_cli.errors import RegradError
from regrad_cli.learner.persistence import load_learner, save_learner
from regrad_cli.lm.models import hash_tensor


@dataclass
class LearnerSpec:
    """Shape of the learner: which modules carry LoRA, rank, scaling, step-size form."""

    rank: int = 8
    lora_alpha: float = 16.0
    layers: list[int] = field(default_factory=list)
    # Short module names inside a decoder block (regrad_cli.learner.targets), in tensor order.
    modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    per_element_alpha: bool = False
    # Regular expressions over full module names; when set they replace layers + modules.
    target_patterns: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def to_dict(self) -> dict:
        """The spec as recorded and hashed. Fields added after format 1.0 appear only when set, so
        every learner that could be written before keeps its checkpoint id."""
        d = asdict(self)
        if not d["target_patterns"]:
            del d["target_patterns"]
        return d


def default_lora(n_layers: int, hidden_size: int) -> tuple[int, float]:
    """(rank, lora_alpha) per model size, following the reference code (method.md §1.1)."""
    if hidden_size >= 4096:
        return 4, 8.0
    if hidden_size >= 3072:
        return 8, 16.0
    if hidden_size >= 2048:
        return 16, 32.0
    return 8, 16.0


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Layer indices from 'upper-half' (default), 'all' or an explicit list."""
    if layers in (None, "upper-half", "upper"):
        return list(range(n_layers // 2, n_layers))
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        raise RegradError(f"unknown layer selection {layers!r} (use 'upper-half', 'all' or a list)")
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise RegradError(f"layer indices {bad} out of range for a {n_layers}-layer model")
    return out


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T`` with externally set A [r, in], B [out, r].

    ``base`` is an ``nn.Linear`` (weight [out, in]) or a transformers ``Conv1D`` (weight [in, out]);
    the side path is the same for both, only the merged-weight view differs (``delta_weight``).
    A and B may also carry a leading per-sample dimension N (then x must be [N, T, in]): every
    sample uses its own adapter, which is how per-document gradients come out of one backward.
    """

    def __init__(self, base: nn.Module, scale: float):
        super().__init__()
        self.in_features, self.out_features = targets.in_out_features(base)
        self.base = base
        self.scale = scale
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self._Bt: torch.Tensor | None = None  # B^T, contiguous, at query time (set_active)

    @property
    def transposed(self) -> bool:
        """True when the base stores its weight as [in, out] (Conv1D)."""
        return not isinstance(self.base, nn.Linear)

    def set_active(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        # Plain attributes, not registered parameters: phi belongs to the learner, and the
        # model's state_dict must stay exactly the base model's.
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)
        # At query time (no autograd through A and B) B^T is laid out contiguously once, here,
        # for the product on every decoded token: addmm takes a faster BLAS path with a
        # contiguous [r, out] operand than with the transposed view of B.
        bt = None
        if (A is not None and B is not None and A.dim() == 2 and B.dim() == 2
                and not A.requires_grad and not B.requires_grad):
            bt = B.t().contiguous()
        object.__setattr__(self, "_Bt", bt)

    def delta_weight(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """What the side path adds to the base weight, in the base's own layout: the merged model
        ``W + delta_weight(A, B)`` computes exactly what the side path does (tests prove it)."""
        delta = self.scale * (B @ A)  # [out, in]
        return delta.t() if self.transposed else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        A, B = self.A, self.B
        if A is None:
            return y
        if A.dim() == 2:
            A = A.to(x.dtype)
            Bt = self._Bt if self._Bt is not None and self._Bt.dtype == x.dtype else B.to(x.dtype).t()
            if y.dtype == x.dtype and y.shape[-1] == Bt.shape[1]:
                # One fused product-and-add: y + scale * (x A^T) B^T, fewer small operations per
                # module on every decoded token (the side path's cost is dispatch, not arithmetic).
                h = x.reshape(-1, x.shape[-1]) @ A.t()
                return torch.addmm(y.reshape(-1, y.shape[-1]), h, Bt, alpha=self.scale).view(y.shape)
            h = (x @ A.t()) @ Bt
        else:
            n = A.shape[0]
            # Some families (OPT) flatten [N, T, d] to [N*T, d] before the MLP: rows stay grouped
            # by sample, so the per-sample view is a reshape.
            flat = x.dim() == 2 and x.shape[0] != n and x.shape[0] % n == 0
            xs = x.reshape(n, -1, x.shape[-1]) if flat else x
            if xs.shape[0] != n:
                raise RegradError(
                    f"per-sample adapter batch {n} != input batch {x.shape[0]}"
                )
            h = torch.bmm(torch.bmm(xs, A.to(x.dtype).transpose(1, 2)), B.to(x.dtype).transpose(1, 2))
            h = h.reshape(*x.shape[:-1], h.shape[-1]) if flat else h
        return y + self.scale * h


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


class Learner(nn.Module):
    """phi (every LoRA A and B) and the step sizes alpha, attached to one model."""

    def __init__(self, spec: LearnerSpec, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.spec = spec
        self.names: list[str] = list(shapes)
        self.phi = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(s)) for n, s in shapes.items()})
        alpha_shape = lambda s: s if spec.per_element_alpha else ()  # noqa: E731
        self.log_alpha = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(alpha_shape(s))) for n, s in shapes.items()}
        )
        # Temperature of score-weighted combination (combine="score"): each retrieved document's
        # gradient is weighted by softmax(score / T); T is meta-learned with phi and alpha.
        self.log_temp = nn.Parameter(torch.tensor(math.log(0.05)))
        self._wrappers: dict[str, LoRALinear] = {}
        self.meta: dict = {}
        # The document-side gradient transform (learner.transform.KeyMap), or None: the paper's
        # plain document gradient. Part of the checkpoint and of its content id when set.
        self.transform = None

    # Construction ---------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        rank: int | None = None,
        lora_alpha: float | None = None,
        layers="upper-half",
        modules=None,
        per_element_alpha: bool = False,
        target_patterns=None,
    ) -> "Learner":
        """An untrained learner shaped for ``model`` (call ``init_`` then ``attach``).

        ``modules`` empty or None: the family's table (regrad_cli.learner.targets); ``target_patterns``
        replace layers and modules. Prefer ``workspace.checkpoints.init_learner``, which reads [lora]."""
        n_layers = targets.n_layers(model)
        d_rank, d_alpha = default_lora(n_layers, targets.hidden_size(model))
        patterns = list(target_patterns or [])
        spec = LearnerSpec(
            rank=rank or d_rank,
            lora_alpha=float(lora_alpha or d_alpha),
            layers=[] if patterns else resolve_layers(layers, n_layers),
            modules=[] if patterns else list(modules or targets.family_modules(model)),
            per_element_alpha=per_element_alpha,
            target_patterns=patterns,
        )
        return cls(spec, target_shapes(model, spec))

    def init_(self, *, seed: int = 0, b_std: float = 1e-3, alpha_init: float = 0.01) -> "Learner":
        """Seeded, deterministic init. B is small and random, not zero: with B = 0 the gradient
        with respect to A is identically zero and only half of phi would carry the document."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n in self.names:
                p = self.phi[_key(n)]
                if n.endswith(".A"):
                    # Kaiming-uniform like peft's A init.
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            for n in self.names:
                self.log_alpha[_key(n)].fill_(math.log(alpha_init))
        return self

    # Access ------------------------------------------------------------------------------
    def tensor(self, name: str) -> nn.Parameter:
        return self.phi[_key(name)]

    def log_alpha_of(self, name: str) -> nn.Parameter:
        """The log step size of tensor ``name`` (a scalar, or its shape with per-element alpha)."""
        return self.log_alpha[_key(name)]

    def alpha(self, name: str) -> torch.Tensor:
        return self.log_alpha[_key(name)].exp()

    @property
    def trained_combine(self) -> str:
        """The combination the learner was meta-trained with ('sum' for an untrained learner)."""
        return self.meta.get("combine", "sum")

    @property
    def trained_norm(self) -> str:
        """The gradient normalisation the learner was meta-trained with (see adapt.normalise)."""
        return self.meta.get("norm", "none")

    @property
    def doc_loss(self) -> str:
        """The loss a document's gradient is taken of (learner/doc_loss.py): ``meta['doc_loss']``,
        absent for every learner made before it could be chosen, which is 'plain'."""
        return self.meta.get("doc_loss", "plain")

    @doc_loss.setter
    def doc_loss(self, name: str) -> None:
        from regrad_cli.learner.doc_loss import check_doc_loss

        self.meta["doc_loss"] = check_doc_loss(name)

    def phi_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.phi[_key(n)] for n in self.names}

    def alpha_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.alpha(n) for n in self.names}

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(self.phi[_key(n)].shape)) for n in self.names]

    @property
    def n_values(self) -> int:
        return sum(self.phi[_key(n)].numel() for n in self.names)

    # Attaching to a model ---------------------------------------------------------------
    def check_fits(self, model: nn.Module) -> None:
        """RegradError unless ``model`` has this learner's target modules, with its tensor shapes
        (a learner loaded from a checkpoint made for another model does not)."""
        try:
            expected = target_shapes(model, self.spec)
        except RegradError as exc:
            raise RegradError(f"the learner does not fit this model (was it trained for another model?): {exc}") from None
        if expected != dict(self.layout):
            raise RegradError("the learner does not fit this model: its LoRA tensors have other names or shapes "
                              "(was it trained for another model?)")

    def attach(self, model: nn.Module) -> "Learner":
        """Wrap the target modules of ``model`` with LoRA side paths using phi, once
        :meth:`check_fits` says they match.

        Only the module tree changes; every base parameter object stays the same tensor."""
        if self._wrappers:
            raise RegradError("learner is already attached to a model")
        self.check_fits(model)
        modules = dict(model.named_modules())
        for mod_name in module_names(self.spec, model):
            base = modules[mod_name]
            if isinstance(base, LoRALinear):
                raise RegradError(f"{mod_name} already carries a LoRA side path")
            wrapper = LoRALinear(base, self.spec.scale)
            parent_name, _, child = mod_name.rpartition(".")
            setattr(modules[parent_name], child, wrapper)
            self._wrappers[mod_name] = wrapper
        device = next(model.parameters()).device
        self.to(device)
        self.use(None)
        return self

    def first_layer(self, model: nn.Module) -> int:
        """The lowest decoder layer with a side path: nothing below it depends on phi."""
        return targets.first_block(model, module_names(self.spec, model))

    def detach_from(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for mod_name, wrapper in self._wrappers.items():
            parent_name, _, child = mod_name.rpartition(".")
            setattr(modules[parent_name], child, wrapper.base)
        self._wrappers = {}

    def use(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Point the side paths at ``weights`` (name -> tensor); None means phi itself."""
        if not self._wrappers:
            raise RegradError("learner is not attached to a model")
        src = self.phi_dict() if weights is None else weights
        for mod_name, wrapper in self._wrappers.items():
            wrapper.set_active(src[mod_name + ".A"], src[mod_name + ".B"])

    def disable(self) -> None:
        """Run the bare base model (no side path at all): the 'closed-book' base system."""
        for wrapper in self._wrappers.values():
            wrapper.set_active(None, None)

    def active_state(self) -> dict[str, tuple]:
        """What every side path uses now (restored by ``restore_state``)."""
        return {n: (w.A, w.B) for n, w in self._wrappers.items()}

    def restore_state(self, state: dict[str, tuple]) -> None:
        for n, (A, B) in state.items():
            self._wrappers[n].set_active(A, B)

    @contextmanager
    def using(self, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Temporarily use ``weights`` (None: phi); the previous state is restored on exit."""
        from regrad_cli.learner.adapt import applied

        with applied(self, weights):
            yield

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily run the bare base model; the previous state is restored on exit."""
        from regrad_cli.learner.adapt import applied

        with applied(self, "off"):
            yield

    @property
    def wrappers(self) -> dict[str, "LoRALinear"]:
        """Adapted module name -> its side path (empty until ``attach``)."""
        return dict(self._wrappers)

    # Identity and persistence ------------------------------------------------------------
    def checkpoint_id(self) -> str:
        """Content id: sha256 over the spec and every tensor of phi and alpha (and the document
        loss and the key map, when the learner has them)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.spec.to_dict(), sort_keys=True).encode())
        for n in self.names:
            h.update(n.encode())
            hash_tensor(h, self.phi[_key(n)])
            hash_tensor(h, self.log_alpha[_key(n)])
        hash_tensor(h, self.log_temp)
        if self.doc_loss != "plain":
            # Only another loss is hashed: every plain learner keeps its id, and a bank built
            # with one loss is stale (rebuilt) for a learner with another.
            h.update(f"doc_loss:{self.doc_loss}".encode())
        if self.transform is not None:
            # Only a learner with a transform hashes it: every plain learner keeps its id.
            for n, t in sorted(self.transform.tensors().items()):
                h.update(n.encode())
                hash_tensor(h, t)
        return h.hexdigest()

    def fingerprint(self) -> dict:
        return {"checkpoint_id": self.checkpoint_id(), "lora": self.spec.to_dict()}

    def save(self, directory: str | Path, extra: dict | None = None) -> str:
        """Write learner.json + learner.safetensors (regrad_cli.learner.persistence); returns the content id."""
        return save_learner(self, directory, extra)

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> "Learner":
        """Read a checkpoint of any known format version (regrad_cli.learner.persistence); with
        ``model``, a tensors file larger than a learner of its spec on that model is refused unread."""
        expect = None if model is None else (lambda spec: sum(math.prod(s) for s in target_shapes(model, spec).values()))
        return load_learner(directory, cls, LearnerSpec, expect_values=expect)


def module_names(spec: LearnerSpec, model: nn.Module) -> list[str]:
    """Full names of the target modules (regrad_cli.learner.targets), in the learner's tensor order."""
    return targets.find_targets(model, spec.layers, spec.modules, spec.target_patterns)


def target_shapes(model: nn.Module, spec: LearnerSpec) -> dict[str, tuple[int, ...]]:
    """{"<module>.A": (rank, in), "<module>.B": (out, rank)} for every target of ``spec``."""
    shapes = {}
    modules = dict(model.named_modules())
    for name in module_names(spec, model):
        base = modules[name]
        if isinstance(base, LoRALinear):
            base = base.base
        n_in, n_out = targets.in_out_features(base)
        shapes[name + ".A"] = (spec.rank, n_in)
        shapes[name + ".B"] = (n_out, spec.rank)
    return shapes
