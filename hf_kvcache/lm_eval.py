"""lm-evaluation-harness with a compressed KV cache: the model type ``hf-kvcache``.

    hf-kvcache lm-eval --model-args pretrained=HuggingFaceTB/SmolLM2-360M,cache=snapkv:budget=256 \\
        --tasks hellaswag --output_path results/     # any other lm-eval flag works too

lm-eval's own ``hf`` model scores a loglikelihood in one forward pass over context and continuation, where no
cache can act. Here context and continuation stream through a fresh cache ``chunk_size`` tokens at a time, as
:func:`hf_kvcache.evaluation.perplexity` streams text, so a compressing cache changes the score the way it
would change generation; rolling loglikelihoods go through the same path, one fresh cache per window.
Generation requests get a fresh cache each: the prompt goes in through :func:`hf_kvcache.prefill`, then
``generate`` continues from it. Requests are batched as lm-eval batches them (left-padded rows).

lm-eval splits ``--model_args`` on commas, so the options of a cache spec are written with semicolons there:
``cache=quantized:nbits=2;group_size=64`` (quote it in the shell). Needs ``pip install
'hf-kvcache[lm-eval]'``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from hf_kvcache.prefill import prefill
from hf_kvcache.registry import build_cache, get_strategy, parse_spec


@register_model("hf-kvcache")
class KVCacheLM(HFLM):
    """lm-eval's ``HFLM`` with every request answered through a fresh cache of strategy ``cache``.

    Args:
        pretrained: a Hub id, a local directory or a loaded model. Default ``None``: the embedded
            SmolLM2-135M-Instruct.
        cache: a strategy spec, options separated by ``;`` (or ``,`` when passed from Python). Default
            ``"full"``.
        chunk_size: tokens per forward while loglikelihood requests stream through the cache. Default 16.
        prefill_chunk_size: tokens per forward while a generation prompt goes in. Default 512.
        kwargs: everything else ``HFLM`` takes (``batch_size``, ``device``, ``dtype``, ...).
    """

    def __init__(
        self,
        pretrained: Any = None,
        cache: str = "full",
        chunk_size: int = 16,
        prefill_chunk_size: int = 512,
        **kwargs: Any,
    ):
        self.cache_spec = str(cache).replace(";", ",")
        strategy, _ = parse_spec(self.cache_spec)  # a bad spec fails before the model loads
        options = set(getattr(strategy.options_class, "__dataclass_fields__", {}))
        stray = sorted(set(kwargs) & options)
        if stray:
            raise ValueError(
                f"model arguments {stray} look like options of the cache spec {cache!r}: lm-eval splits "
                f"--model_args on commas, so write the spec's options with ';' (cache={strategy.name}:"
                f"{';'.join(f'{name}={kwargs[name]}' for name in stray)})"
            )
        for name, value in (("chunk_size", chunk_size), ("prefill_chunk_size", prefill_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.chunk_size, self.prefill_chunk_size = chunk_size, prefill_chunk_size
        if pretrained is None:
            from hf_kvcache.evaluation.model import embedded_model_dir

            pretrained = str(embedded_model_dir())
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        get_strategy(strategy.name)

    def new_cache(self):
        """A fresh cache of this model's strategy."""
        return build_cache(self.cache_spec, self.model)

    @torch.no_grad()
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        cache = prefill(self.model, context, self.new_cache(), self.prefill_chunk_size, attention_mask=mask)
        return super()._model_generate(context, max_length, stop, past_key_values=cache, **generation_kwargs)

    @torch.no_grad()
    def _stream_log_probs(self, rows: list[list[int]], scored: int) -> torch.Tensor:
        """Log-probabilities ``[B, scored, vocab]`` of the last ``scored`` positions of ``rows`` (token lists,
        left-padded to one length), fed through a fresh cache ``chunk_size`` tokens at a time."""
        length = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask == 0).any())  # without padding, the same forwards as hf_kvcache's perplexity
        cache, kept = self.new_cache(), []
        for start in range(0, length, self.chunk_size):
            stop = min(start + self.chunk_size, length)
            logits = self.model(
                input_ids=ids[:, start:stop],
                attention_mask=mask[:, :stop] if padded else None,
                position_ids=positions[:, start:stop] if padded else None,
                past_key_values=cache,
                use_cache=True,
            ).logits
            first = max(start, length - scored)  # only the positions whose predictions are scored are kept
            if first < stop:
                kept.append(F.log_softmax(logits[:, first - start :].float(), dim=-1))
        return torch.cat(kept, dim=1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        from lm_eval.models.utils import Collator
        from tqdm import tqdm

        def longest_first(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        ordered = Collator(requests, sort_fn=longest_first)
        size = override_bs or (self.batch_size if self.batch_size != "auto" else 1)
        results = []
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood via cache"
        )
        for chunk in ordered.get_batched(n=size):
            rows, continuations = [], []
            for _, context, continuation in chunk:
                # Predictions come from every token but the last; the oldest tokens go past max_length.
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
                continuations.append(continuation)
            scored = max(map(len, continuations))
            log_probs = self._stream_log_probs(rows, scored)
            for (request, _, _), continuation, row in zip(chunk, continuations, log_probs, strict=True):
                own = row[scored - len(continuation) :]  # [len(continuation), vocab]
                targets = torch.tensor(continuation, device=own.device)
                greedy = bool((own.argmax(-1) == targets).all())
                answer = (float(own.gather(1, targets[:, None]).sum()), greedy)
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        return ordered.get_original(results)


def run_cli(argv: list[str]) -> int:
    """lm-eval's command line with ``--model hf-kvcache``; ``--model-args`` stands for ``--model_args``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    given = [arg.split("=", 1)[0] for arg in argv]
    if "--model" in given:
        raise SystemExit("error: hf-kvcache lm-eval always runs the model type 'hf-kvcache'; drop --model")
    renamed = [
        arg.replace("--model-args", "--model_args", 1) if arg.startswith("--model-args") else arg
        for arg in argv
    ]
    saved, sys.argv = sys.argv, ["lm-eval", "--model", "hf-kvcache", *renamed]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
