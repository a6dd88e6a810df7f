"""Continuation perplexity: how well a cache that holds a (compressed) context predicts the text that follows.

Streaming perplexity (:mod:`.perplexity`) scores every token as the cache grows, so a cache that compresses
once after a context (SnapKV's prompt, kvzip's ``compress_context``) is scored mostly uncompressed. This
metric follows the compress-first protocol instead: the first ``context`` corpus tokens go in (chunks of
512, as :func:`hf_kvcache.prefill` feeds them), the cache compresses what it holds if it can
(``cache.compress_context()``), and the next ``tokens`` tokens are fed in chunks of ``--chunk-size``, each
predicted from the cache as it then stands. The perplexity is over those continuation tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_kvcache.evaluation.metric import Column, Metric, register_metric
from hf_kvcache.registry import check_int


@dataclass(frozen=True)
class ContinuationOptions:
    """Options of the continuation metric."""

    context: int = field(default=1024, metadata={"help": "corpus tokens held (and compressed) first"})
    tokens: int = field(default=256, metadata={"help": "continuation tokens scored after the context"})

    def __post_init__(self):
        check_int("continuation context", self.context, 1)
        check_int("continuation tokens", self.tokens, 2, " (the first one is only fed)")


@register_metric
class ContinuationMetric(Metric):
    """Perplexity of the ``tokens`` that follow a ``context`` the cache holds, compressed where the cache
    compresses on request (see the module docstring), and the bytes it holds after the context."""

    name = "continuation"
    summary = "perplexity of the text after a held (compressed) context, and bytes after the context"
    options_class = ContinuationOptions
    in_defaults = False
    columns = (
        Column("continuation_perplexity", "continuation ppl", "{:.3f}"),
        Column("continuation_ratio", "× full", "{:.3f}"),
        Column("context_bytes", "MiB after context", "mib"),
    )

    def work(self, run) -> int:
        return self.options.context + self.options.tokens

    def measure(self, run, spec: str, tick) -> dict:
        from hf_kvcache.base import cache_nbytes
        from hf_kvcache.evaluation.corpus import corpus_token_ids
        from hf_kvcache.evaluation.perplexity import perplexity
        from hf_kvcache.prefill import prefill
        from hf_kvcache.registry import build_cache

        context, tokens = self.options.context, self.options.tokens
        ids = corpus_token_ids(run.tokenizer, run.text, context + tokens).to(run.model.device)
        if ids.shape[1] < context + tokens:
            raise ValueError(
                f"the continuation metric needs {context + tokens} corpus tokens, the text has {ids.shape[1]}"
            )
        cache = build_cache(spec, run.model)
        prefill(run.model, ids[:, :context], cache, chunk_size=512, leave_last=False)
        tick(context)
        compress = getattr(cache, "compress_context", None)
        if compress is not None:
            compress()
        held = cache_nbytes(cache)
        # Continuation token i is predicted from the cache holding the context and continuation tokens < i.
        result = perplexity(
            run.model, ids[:, context : context + tokens], cache, run.settings.chunk_size, on_chunk=tick
        )
        return {
            "continuation_perplexity": result.perplexity,
            "mean_nll": result.mean_nll,
            "num_tokens": result.num_tokens,
            "context_bytes": held,
        }

    def finish_rows(self, rows: list[dict]) -> None:
        full = next((r for r in rows if r["strategy"] == "full" and "continuation_perplexity" in r), None)
        for row in rows:
            if full is not None and "continuation_perplexity" in row:
                row["continuation_ratio"] = row["continuation_perplexity"] / full["continuation_perplexity"]
