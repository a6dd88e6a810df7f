"""Tiny seeded random models over several architectures, built in memory so tests run fast."""

from __future__ import annotations

import os

# Without an NVIDIA driver, Triton's kernels (tests/test_triton_attention.py) run in its interpreter, which
# must be chosen before Triton is first imported (torch and transformers import it).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96

# Each architecture: config class and the options that make it small. Phi3 uses partial rotary embeddings.
ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "llama-gqa": (LlamaConfig, {"num_key_value_heads": 2}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, {"use_sliding_window": False, "head_dim": 16}),
    "phi3": (Phi3Config, {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
}

# Local (sliding-window) layers next to global ones, model-specific attention math, fused projections. Windows
# of 8 tokens, so that the short runs of the tests go past them.
WINDOW = 8
ALTERNATING = ["sliding_attention", "full_attention"] * 2
MORE_ARCHITECTURES = {
    # Gemma 2: logit soft-capping, query_pre_attn_scalar; eager attention only.
    "gemma2": (Gemma2Config, {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 32,
                              "layer_types": ALTERNATING}),
    # Gemma 3: q/k norms, separate RoPE for local and global layers.
    "gemma3": (Gemma3TextConfig, {"sliding_window": WINDOW, "head_dim": 16, "query_pre_attn_scalar": 32,
                                  "layer_types": ALTERNATING}),
    "cohere2": (Cohere2Config, {"sliding_window": WINDOW, "layer_types": ALTERNATING}),
    # gpt-oss: attention sinks, mixture of experts; eager attention only.
    "gpt-oss": (GptOssConfig, {"sliding_window": WINDOW, "head_dim": 16, "num_local_experts": 4,
                               "num_experts_per_tok": 2, "layer_types": ALTERNATING}),
    "mistral-sliding": (MistralConfig, {"sliding_window": WINDOW}),
    "qwen2-sliding": (Qwen2Config, {"use_sliding_window": True, "sliding_window": WINDOW,
                                    "max_window_layers": 1}),
    "olmo2": (Olmo2Config, {}),
    "granite": (GraniteConfig, {"attention_multiplier": 0.5}),
    # GPT-NeoX: one fused query_key_value projection, partial rotary.
    "gpt-neox": (GPTNeoXConfig, {"rotary_pct": 0.5}),
}  # fmt: skip
EAGER_ONLY = {"gemma2", "gpt-oss"}


def make_tiny_model(arch: str = "llama", seed: int = 0, num_layers: int = 2, attn: str = "sdpa", **overrides):
    """A seeded random causal LM of architecture ``arch`` with 4 query heads of size 16, in float32."""
    config_class, extra = {**ARCHITECTURES, **MORE_ARCHITECTURES}[arch]
    if arch in EAGER_ONLY:
        attn = "eager"
    layer_types = overrides.get("layer_types", extra.get("layer_types"))
    if layer_types is not None:
        num_layers = len(layer_types)
    options = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    options.update(extra)
    options.update(overrides)
    config = config_class(**options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    # Random init gives near-uniform attention; larger q/k weights make attention peaked like a real model's,
    # so that compression errors show up in the logits instead of averaging away.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "qkv_proj", "query_key_value")):
                param.mul_(4.0)
    return model.eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture
def llama():
    return make_tiny_model("llama")


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded_ids(length: int, pads: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``ids`` ``[len(pads), length]`` whose row i starts with ``pads[i]`` padding tokens (id 0), and
    the matching attention ``mask``."""
    ids = random_ids(length, batch=len(pads), seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def assert_left_padded_rows_match_unpadded_runs(
    model, make_cache, length: int, pads: tuple[int, ...], max_new_tokens: int, seed: int = 0
) -> None:
    """Greedy-generate a left-padded batch (row i padded by ``pads[i]``) with one cache, and each row alone
    with a fresh cache: every row's new tokens must be the same."""
    ids, mask = left_padded_ids(length, pads, seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=make_cache(), **kwargs)
    for row in range(len(pads)):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(input_ids=alone, past_key_values=make_cache(), **kwargs)
        assert torch.equal(out[row, -max_new_tokens:], single[0, -max_new_tokens:]), f"row {row}"


FILLER = (
    "The river runs past the old mill and the green hills. A farmer walks to town every morning with bread, "
    "apples and milk. Children play near the bridge while the baker sells warm cakes. In the evening the "
    "lights of the houses shine over the water, and the wind carries the sound of bells from the church. "
)


def save_tiny_model(folder, arch: str = "llama"):
    """Save a tiny random model with a small BPE tokenizer trained on :data:`FILLER`, loadable by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    backend.train_from_iterator([FILLER, "0123456789 pass key is What ? . ,"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def filler_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "filler.txt"
    path.write_text(FILLER * 60, encoding="utf-8")
    return str(path)
