"""A learned document-side gradient transform: the document key map (first order, MEND-style).

A step on a LoRA B is a linear-attention write. The paper's document gradient of one adapted
module is built from the module's inputs X [T, in] and the loss gradients at its outputs
Delta [T, out] over the document's T tokens:

    g_B = s * Delta^T X A^T        g_A = s * B^T Delta^T X

so a question token x_q reads the write through the same projection A that wrote it
(<A x_t, A x_q>), although document and question contexts differ. The key map gives the document
side its own projections, per adapted module:

    g_B = s * Delta^T X K^T        (K [r, in]: document keys)
    g_A = s * V Delta^T X          (V [r, out]: document values for A)

The result has the plain gradient's shapes, so a bank stores it and a query applies it unchanged.
With K = A and V = B^T it IS the plain gradient (``KeyMap.identity``; tested).

Optional learned per-token weights (CaMeLS-style, first order; ``KeyMap.enable_token_weights``):
per module a scorer w_t = 2 sigmoid(u . x_t + b) of the token's module input multiplies each
document token's loss gradient before the sum,

    g_B = s * (w * Delta)^T X K^T        g_A = s * V (w * Delta)^T X

initialised at u = 0, b = 0, where w = 1 and the map is exactly the unweighted one (tested). They
are stored as ``transform.<module>.u`` [in] and ``transform.<module>.b`` [] only when enabled; a
map without them loads and hashes as before. They need only X and Delta, so they train with phi
frozen and the factor cache.

- The factors X, Delta come from one ordinary forward+backward of the document loss with hooks,
  detached: the transform's meta-gradient (outer answer loss -> K, V) needs no double backward.
- ``GradientMatch`` fits K and V in closed form (ridge least squares, exact): over training
  documents whose questions are known, the transformed gradient is matched to the sum of the
  gold question -> answer gradients (what one step per document can do at best,
  ``benchmarks/injection_bounds.py``). Only the normal equations are kept: in x in and out x out
  per module, however many documents.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from regrad_cli.errors import RegradError

KIND = "keymap"
TENSOR_PREFIX = "transform."


def _key(name: str) -> str:
    return name.replace(".", "__")


class KeyMap(nn.Module):
    """K [r, in] and V [r, out] for every adapted module (names without the .A/.B suffix)."""

    def __init__(self, shapes: Mapping[str, tuple[int, int, int]], token_weights: bool = False):
        """``shapes[module] = (r, in, out)``; ``token_weights``: with the per-token scorers (u, b)
        at zero (every weight 1)."""
        super().__init__()
        self.modules_ = list(shapes)
        self.K = nn.ParameterDict({_key(m): nn.Parameter(torch.zeros(r, i)) for m, (r, i, o) in shapes.items()})
        self.V = nn.ParameterDict({_key(m): nn.Parameter(torch.zeros(r, o)) for m, (r, i, o) in shapes.items()})
        # Registered after K and V and empty unless enabled: a map without token weights has the
        # same parameters, in the same order, as before they existed (optimiser states resume).
        self.score_u = nn.ParameterDict()
        self.score_b = nn.ParameterDict()
        if token_weights:
            self.enable_token_weights()

    @property
    def token_weights(self) -> bool:
        """True when the map weighs each document token (score_u, score_b)."""
        return len(self.score_u) > 0

    def enable_token_weights(self) -> "KeyMap":
        """Add the per-token scorers at u = 0, b = 0 (w = 1: the map computes what it did)."""
        if not self.token_weights:
            for m in self.modules_:
                k = self.K[_key(m)]
                self.score_u[_key(m)] = nn.Parameter(torch.zeros(k.shape[1], dtype=k.dtype, device=k.device))
                self.score_b[_key(m)] = nn.Parameter(torch.zeros((), dtype=k.dtype, device=k.device))
        return self

    def weights_of(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights [N, T, 1] of ``module`` for its inputs x [N, T, in]; None without
        token weights."""
        if not self.token_weights:
            return None
        k = _key(module)
        return 2.0 * torch.sigmoid(x @ self.score_u[k].to(x.dtype) + self.score_b[k].to(x.dtype)).unsqueeze(-1)

    @classmethod
    def identity(cls, learner) -> "KeyMap":
        """K = A and V = B^T: the plain document gradient (the starting point of a fit)."""
        km = cls.for_learner(learner)
        with torch.no_grad():
            for m in km.modules_:
                km.K[_key(m)].copy_(learner.tensor(m + ".A"))
                km.V[_key(m)].copy_(learner.tensor(m + ".B").t())
        return km

    @classmethod
    def for_learner(cls, learner) -> "KeyMap":
        shapes = {}
        for name, shape in learner.layout:
            mod, _, part = name.rpartition(".")
            if part == "A":
                shapes.setdefault(mod, [shape[0], shape[1], 0])[1] = shape[1]
            elif part == "B":
                shapes.setdefault(mod, [shape[1], 0, shape[0]])[2] = shape[0]
        return cls({m: tuple(s) for m, s in shapes.items()}).to(next(learner.parameters()).device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor, as stored in learner.safetensors."""
        out = {}
        for m in self.modules_:
            out[f"{TENSOR_PREFIX}{m}.K"] = self.K[_key(m)]
            out[f"{TENSOR_PREFIX}{m}.V"] = self.V[_key(m)]
            if self.token_weights:
                out[f"{TENSOR_PREFIX}{m}.u"] = self.score_u[_key(m)]
                out[f"{TENSOR_PREFIX}{m}.b"] = self.score_b[_key(m)]
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "KeyMap | None":
        mods = sorted({n[len(TENSOR_PREFIX):-2] for n in tensors if n.startswith(TENSOR_PREFIX)})
        if not mods:
            return None
        shapes = {}
        for m in mods:
            try:
                k, v = tensors[f"{TENSOR_PREFIX}{m}.K"], tensors[f"{TENSOR_PREFIX}{m}.V"]
            except KeyError as exc:
                raise RegradError(f"key map tensor {exc} missing") from None
            if k.dim() != 2 or v.dim() != 2 or k.shape[0] != v.shape[0]:
                raise RegradError(f"key map tensors of {m} have inconsistent shapes")
            shapes[m] = (k.shape[0], k.shape[1], v.shape[1])
        weighted = {m for m in mods if f"{TENSOR_PREFIX}{m}.u" in tensors or f"{TENSOR_PREFIX}{m}.b" in tensors}
        if weighted and weighted != set(mods):
            raise RegradError(f"key map token weights missing for module(s) {sorted(set(mods) - weighted)[:3]}")
        for m in weighted:
            try:
                u, b = tensors[f"{TENSOR_PREFIX}{m}.u"], tensors[f"{TENSOR_PREFIX}{m}.b"]
            except KeyError as exc:
                raise RegradError(f"key map tensor {exc} missing") from None
            if tuple(u.shape) != (shapes[m][1],) or b.dim() != 0:
                raise RegradError(f"key map token weights of {m} have inconsistent shapes")
        km = cls(shapes, token_weights=bool(weighted))
        with torch.no_grad():
            for m in mods:
                km.K[_key(m)].copy_(tensors[f"{TENSOR_PREFIX}{m}.K"])
                km.V[_key(m)].copy_(tensors[f"{TENSOR_PREFIX}{m}.V"])
                if weighted:
                    km.score_u[_key(m)].copy_(tensors[f"{TENSOR_PREFIX}{m}.u"])
                    km.score_b[_key(m)].copy_(tensors[f"{TENSOR_PREFIX}{m}.b"])
        return km

    def check_fits(self, learner) -> None:
        for name, shape in learner.layout:
            mod, _, part = name.rpartition(".")
            if _key(mod) not in self.K:
                raise RegradError(f"key map has no entry for module {mod}")
            r, i = self.K[_key(mod)].shape
            o = self.V[_key(mod)].shape[1]
            want = (r, i) if part == "A" else (o, r)
            if tuple(shape) != want:
                raise RegradError(f"key map of {mod} does not fit the learner's {name} {tuple(shape)}")

    def gradients(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                  names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Transformed per-document gradients {name: [N, ...]} from factors {module: (X [N, T, in],
        Delta [N, T, out])}; differentiable in K, V (and the token weights' u, b) only (the factors
        are detached)."""
        out = {}
        weighted: dict[str, torch.Tensor] = {}
        for name in names:
            mod, _, part = name.rpartition(".")
            x, d = factors[mod]
            if self.token_weights:
                if mod not in weighted:
                    weighted[mod] = d * self.weights_of(mod, x).to(d.dtype)
                d = weighted[mod]
            if part == "B":
                # s * Delta^T (X K^T): [N, out, r]
                out[name] = scale * torch.bmm(d.transpose(1, 2), x @ self.K[_key(mod)].t())
            else:
                # s * V (Delta^T X) = s * (V Delta^T) X: [N, r, in]
                out[name] = scale * torch.bmm((d @ self.V[_key(mod)].t()).transpose(1, 2), x)
        return out


def capture_factors(model, learner, loss_fn: Callable[[], torch.Tensor],
                    base: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    """Run ``loss_fn`` (per-sample losses [N], computed by ``model``) with the side paths on
    ``base`` (default phi) and backpropagate their sum once; returns ({module: (X [N, T, in],
    Delta [N, T, out])}, the losses [N]), all detached. Nothing of phi is updated."""
    caps: dict = {}
    hooks = []

    def fwd(mod_name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: caps.__setitem__(mod_name, (x, g.detach())))
        return hook

    for mod_name, wrapper in learner.wrappers.items():
        hooks.append(wrapper.register_forward_hook(fwd(mod_name)))
    try:
        src = base if base is not None else learner.phi_dict()
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in src.items()}
        with torch.enable_grad(), learner.using(leaves):
            loss = loss_fn()
            loss.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in learner.wrappers if m not in caps]
    if missing:
        raise RegradError(f"no loss gradient reached adapted module(s) {missing[:3]}")
    out = {}
    for m, (x, d) in caps.items():
        if x.dim() != 3:  # families that flatten [N, T, d] -> [N*T, d] before the MLP (OPT)
            raise RegradError(f"module {m} sees flattened inputs: the key map needs [N, T, d]")
        out[m] = (x, d.to(x.dtype))
    return out, loss.detach()


def document_factors(model, learner, docs, indices: Sequence[int], loss_fn_for: Callable | None = None,
                     base: Mapping[str, torch.Tensor] | None = None, *, prefix=None) -> list[tuple[dict, float]]:
    """Each of documents ``indices`` of ``docs`` (EncodedDocs, right-padded): its factors {module:
    (X [T_d, in], Delta [T_d, out])} over its own tokens and its loss, from one capture pass of
    the learner's document loss. The plain loss runs ``loss_fn_for(input_ids, attention_mask)``
    (default ``per_sample_nll``) on the documents' rows; another loss (doc_loss.py) on its own
    rows, whose factors are concatenated along the tokens per document (the key map is linear in
    them: the sum of the rows' transformed gradients). Modules reading one input share one X."""
    from regrad_cli.lm.tokens import per_sample_nll

    device = next(model.parameters()).device
    kind = learner.doc_loss
    indices = list(indices)
    if kind == "plain":
        idx = torch.tensor(indices)
        width = int(max(docs.n_tokens[i] for i in indices))
        ids, mask = docs.input_ids[idx, :width].to(device), docs.attention_mask[idx, :width].to(device)
        fn = loss_fn_for or (lambda i, m: per_sample_nll(model, i, m, prefix=prefix))
        factors, losses = capture_factors(model, learner, lambda: fn(ids, mask), base)
        row_of = [[(j, int(docs.n_tokens[i]))] for j, i in enumerate(indices)]
        doc_losses = [float(v) for v in losses]
    else:
        from regrad_cli.learner.doc_loss import build_rows

        rows = build_rows(kind, docs.tokenizer, [docs.texts[i] for i in indices],
                          docs.max_tokens or docs.input_ids.shape[1], model=model, learner=learner, base=base)
        factors, row_losses = capture_factors(model, learner, lambda: rows.losses(model, prefix), base)
        row_of = [[(r, rows.n_tokens[r]) for r, d in enumerate(rows.doc) if d == j] for j in range(len(indices))]
        doc_losses = [float(v) for v in rows.per_document(row_losses, len(indices))]
    out = []
    for j in range(len(indices)):
        shared: dict[int, torch.Tensor] = {}
        per = {}
        for m, (x, d) in factors.items():
            if x.data_ptr() not in shared:
                shared[x.data_ptr()] = _join([x[r, :n] for r, n in row_of[j]])
            per[m] = (shared[x.data_ptr()], _join([d[r, :n] for r, n in row_of[j]]))
        out.append((per, doc_losses[j]))
    return out


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class GradientMatch:
    """Normal equations of the key map's ridge fit, accumulated document by document.

    For document d with factors (X_d, Delta_d) and target gradient T_d (the sum of its questions'
    answer-loss gradients), both scaled to unit norm over all tensors (so every document weighs
    the same): minimise sum_d ||s Delta_d^T X_d K^T - T_d,B||^2 over K, and
    ||s V Delta_d^T X_d - T_d,A||^2 over V, per module, plus a ridge term."""

    def __init__(self, scale: float, *, with_a: bool = True, dtype: torch.dtype = torch.float32):
        self.scale = scale
        self.with_a = with_a  # False: fit K only (a B-only map); the A side's out x out system is skipped
        self.dtype = dtype
        self.eq: dict[str, dict[str, torch.Tensor]] = {}
        self.n_docs = 0

    def add(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], target: Mapping[str, torch.Tensor],
            plain_norm: float) -> None:
        """One document: factors of a single document ([1, T, ...] or [T, ...]), its target
        gradient {name: tensor} (divided by its own norm) and ``plain_norm``, the norm of its
        plain gradient, which divides the predictor: each document's unit step is matched to
        its unit target, as a query normalises each document's gradient."""
        tn = math.sqrt(sum(float(t.double().pow(2).sum()) for t in target.values())) or 1.0
        for m, (x, d) in factors.items():
            x = (x[0] if x.dim() == 3 else x).to(self.dtype) * (self.scale / (plain_norm or 1.0))
            d = (d[0] if d.dim() == 3 else d).to(self.dtype)
            e = self.eq.setdefault(m, {})
            parts = [("gtg", x.t() @ ((d @ d.t()) @ x)),                           # G^T G, G = Delta^T X [in, in]
                     ("gtt", x.t() @ (d @ (target[m + ".B"].to(self.dtype) / tn)))]  # G^T T_B             [in, r]
            if self.with_a:
                parts += [("ggt", d.t() @ ((x @ x.t()) @ d)),                      # G G^T               [out, out]
                          ("tgt", (target[m + ".A"].to(self.dtype) / tn) @ (x.t() @ d))]  # T_A G^T      [r, out]
            for k, v in parts:
                e[k] = e[k] + v if k in e else v
        self.n_docs += 1

    def solve(self, keymap: KeyMap, ridge: float = 0.01) -> KeyMap:
        """Write the ridge solution into ``keymap`` (ridge relative to the mean diagonal)."""
        if not self.eq:
            raise RegradError("gradient matching needs at least one training document")
        with torch.no_grad():
            for m, e in self.eq.items():
                G = e["gtg"]
                G = G.double()
                k = torch.linalg.solve(G + ridge * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype),
                                       e["gtt"].double()).t()
                keymap.K[_key(m)].copy_(k.to(keymap.K[_key(m)].dtype))
                if "ggt" in e:
                    H = e["ggt"].double()
                    v = torch.linalg.solve(H + ridge * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype),
                                           e["tgt"].double().t()).t()
                    keymap.V[_key(m)].copy_(v.to(keymap.V[_key(m)].dtype))
                else:
                    keymap.V[_key(m)].zero_()
        return keymap


class FactorCache:
    """Documents' factors (X, Delta) at a FIXED phi, reused across meta-steps.

    When phi does not change (meta-training the key map with phi frozen), a document's factors
    are the same every time it is drawn: one forward+backward per document for the whole run
    instead of one per draw. Factors are kept per document text, trimmed to its real tokens, in
    ``dtype`` (bfloat16 by default: half the memory; a relative rounding of ~4e-3, far below the
    bank codec's int4 rounding the step passes through anyway; float32 keeps them exact), up to
    ``max_bytes`` (least recently used out first). Only valid while phi is fixed: the caller
    guarantees it (meta_train refuses the cache without --freeze-phi).

    ``float8`` (``torch.float8_e4m3fn``) halves the memory again: each token's row is scaled by
    its largest magnitude before rounding (a relative rounding of at most 2^-4 per element, and
    a measured error of the summed gradient in ``tests/test_transform.py``; still finer than the
    int4 bank codec the step passes through). Modules that read the same input (an MLP's gate and
    up projections) keep one copy of it."""

    DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8": torch.float8_e4m3fn}

    def __init__(self, max_bytes: int, dtype: "torch.dtype | str" = torch.bfloat16, capture_batch: int = 4):
        from collections import OrderedDict

        self.capture_batch = max(1, int(capture_batch))

        if isinstance(dtype, str):
            if dtype not in self.DTYPES:
                raise RegradError(f"unknown factor cache dtype {dtype!r} (use {', '.join(self.DTYPES)})")
            dtype = self.DTYPES[dtype]
        self.max_bytes, self.dtype = int(max_bytes), dtype
        self._docs: "OrderedDict[tuple[str, str], tuple[dict, float, int]]" = OrderedDict()  # (loss, text)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._docs)

    def _pack(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A [T, dim] float factor as stored: (values, per-row scale or None)."""
        if self.dtype == torch.float8_e4m3fn:
            scale = t.float().abs().amax(1, keepdim=True).clamp_min(1e-30) / 448.0
            return (t.float() / scale).to(self.dtype), scale
        return t.to(self.dtype).clone(), None

    @staticmethod
    def _unpack(packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        values, scale = packed
        return values.float() if scale is None else values.float() * scale

    @staticmethod
    def _size(factors: dict) -> int:
        seen, size = set(), 0
        for pair in factors.values():
            for values, scale in pair:
                for t in (values, scale):
                    if t is not None and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        size += t.numel() * t.element_size()
        return size

    def _put(self, text, factors: dict, loss: float) -> None:
        size = self._size(factors)
        if size > self.max_bytes:
            return
        while self._docs and self.bytes + size > self.max_bytes:
            _, (_, _, old) = self._docs.popitem(last=False)
            self.bytes -= old
        self._docs[text] = (factors, loss, size)
        self.bytes += size

    def gradients(self, model, learner, texts: list[str], docs, loss_fn_for: Callable | None = None,
                  base: Mapping[str, torch.Tensor] | None = None, *,
                  prefix=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-document transformed gradients {name: [N, ...]} and losses [N] of ``texts``
        (encoded as ``docs``: EncodedDocs, right-padded), differentiable in the map only.
        ``loss_fn_for(input_ids, attention_mask)`` gives per-sample losses under ``model`` for the
        plain document loss (default: ``per_sample_nll`` with ``prefix``); another document loss
        (``learner.doc_loss``) builds its own rows (``document_factors``). Entries are kept per
        (document loss, text): factors of one loss are never served for another."""
        kind = learner.doc_loss
        keys = [(kind, t) for t in texts]
        missing = [i for i, k in enumerate(keys) if k not in self._docs]
        first = {}
        for i in missing:
            first.setdefault(keys[i], i)
        rows = list(first.values())
        self.hits += len(texts) - len(rows)  # every draw but the one computation of each new text
        self.misses += len(rows)
        fresh = {}
        # Missing documents in small groups: each document's factors and loss are its own (the
        # loss is per sample), so grouping changes nothing but the peak memory of the graph.
        for lo in range(0, len(rows), self.capture_batch):
            group = rows[lo:lo + self.capture_batch]
            for i, (factors, loss) in zip(group, document_factors(model, learner, docs, group, loss_fn_for, base,
                                                                  prefix=prefix)):
                shared: dict[int, tuple] = {}  # one stored copy of an input several modules read
                per = {}
                for m, (x, d) in factors.items():
                    if id(x) not in shared:
                        shared[id(x)] = self._pack(x)
                    per[m] = (shared[id(x)], self._pack(d))
                fresh[keys[i]] = (per, loss)
                self._put(keys[i], per, loss)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in learner.names}
        losses_out = []
        for t in keys:
            if t in fresh:
                per, loss = fresh[t]
            else:
                per, loss, _ = self._docs[t]
                self._docs.move_to_end(t)
            f32 = {m: (self._unpack(x).unsqueeze(0), self._unpack(d).unsqueeze(0)) for m, (x, d) in per.items()}
            g = learner.transform.gradients(f32, learner.spec.scale, learner.names)
            for n in learner.names:
                out[n].append(g[n])
            losses_out.append(loss)
        return {n: torch.cat(v) for n, v in out.items()}, torch.tensor(losses_out)
