"""KVzip: keep the context entries the model needs to reconstruct the context, whatever the question.

Paper: "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (Kim et al., 2025),
https://arxiv.org/abs/2505.23416
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch

from hf_kvcache.budget import Budget, check_budget, check_layer_budgets, tokens
from hf_kvcache.held import RowTensor, check_batch
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.ragged import (
    RaggedContext,
    RaggedEntries,
    check_ragged_quantization,
    highest_entries,
    require_entry_point,
)
from hf_kvcache.strategies.reconstruction import prompt_ids, reconstruct
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer, attention_mass

DEFAULT_PROMPT = "Repeat the previous context exactly."
BUDGET_SPLITS = ("adaptive", "uniform")
# The score of a protected entry: above any attention weight, so a budget takes protected entries first.
PROTECTED = 2.0


@dataclass(frozen=True)
class KVzipOptions:
    """Options of :class:`KVzipCache`; see there."""

    budget: Budget = 256
    chunk_size: int = 512
    head_budgets: str = "adaptive"
    layer_budgets: str = "adaptive"
    # The paper protects nothing; spelled in a canonical spec only when set, so that specs stay stable.
    num_sink_tokens: int = field(default=0, metadata=WHEN_SET)
    recent: Budget = field(default=0, metadata=WHEN_SET)
    # Spelled in a canonical spec only when set: the default prompt is a sentence.
    prompt: str | None = field(default=DEFAULT_PROMPT, metadata=WHEN_SET)
    tokenizer: str | None = field(default=None, metadata=WHEN_SET)
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})

    def __post_init__(self):
        check_budget(self, sinks="num_sink_tokens", recent="recent")
        check_ragged_quantization(self.quantization)
        if self.head_budgets not in BUDGET_SPLITS:
            raise ValueError(f"head_budgets must be one of {list(BUDGET_SPLITS)}, got {self.head_budgets!r}")
        check_layer_budgets(self, (*BUDGET_SPLITS, "pyramid"))
        if self.layer_budgets == "adaptive" and self.head_budgets != "adaptive":
            raise ValueError(
                "layer_budgets=adaptive shares one budget among every head of every layer, which needs "
                f"head_budgets=adaptive, got head_budgets={self.head_budgets!r}"
            )
        check_int("chunk_size", self.chunk_size, 1, " (context tokens per reconstruction pass)")
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ValueError(f"prompt must be a non-empty instruction or None, got {self.prompt!r}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ValueError(
                f"tokenizer must be a Hub id or folder (a string) or None, got {self.tokenizer!r}"
            )


class KVzipLayer(RaggedContext, ScoringLayer):
    """Holds every entry until the cache compresses, then keeps the entries the reconstruction queries
    attended to most (the largest weight any of them gave, over the query heads of the KV head): ``budget``
    per KV head (``uniform``), or ``budget`` times the heads per layer, wherever they score highest
    (``adaptive``, held in :class:`~hf_kvcache.strategies.ragged.RaggedEntries`); the protected entries
    (``sinks``, ``recent``) first, out of the same budget. Tokens that come after the compression are
    appended (the *tail*: the slots of the eviction contract, equal for every head).

    While the cache reconstructs, an update scores and hands attention the held entries plus the new ones,
    but stores nothing: each reconstruction pass sees the context, the prompt and its own chunk only.
    """

    context_ids = RowTensor("token ids seen until the compression [B, seen], int64 (first layer only)")

    def __init__(self, options: KVzipOptions, state):
        # Adaptive budgets and packed entries attend through the entry point, which must then be installed.
        self.quantization = options.quantization
        self.reads_storage = options.head_budgets == "adaptive" or options.quantization is not None
        super().__init__(options.budget, state, options.num_sink_tokens, options.recent)

    def reset(self) -> None:
        super().reset()
        self.compressed = self.compressing = self.reconstructing = False
        self.peak = self.reconstruction_valid = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.ragged = RaggedEntries(self.quantization)

    def capacity(self, new: int) -> int:
        return super().capacity(new) if self.compressing else sys.maxsize

    def get_max_length(self) -> int:
        return -1

    def wants_queries(self, new: int) -> bool:
        return self.reconstructing

    def observe_attention(self, keys, new_valid, real_in_full, evicting: bool) -> None:
        self.take_queries(required=False)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.reconstructing:
            return super().update(key_states, value_states, *args, **kwargs)
        held_keys, held_values = self.held()
        context = held_keys.shape[-2]
        keys, values = torch.cat([held_keys, key_states], -2), torch.cat([held_values, value_states], -2)
        queries, math = self.take_queries(required=True)
        valid = self.reconstruction_valid.to(self.device)  # [B, context + new]
        peak = attention_mass(queries, keys, valid[:, context:], valid, context, math, peak=True)
        peak = peak[..., :context]
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        return keys, values

    # --- compression ----------------------------------------------------------------------------------------
    def capacity_now(self) -> int:
        return super().capacity(0)  # the budget, never under what is protected (this class's is unbounded)

    def compress(self, keep: torch.Tensor | None = None) -> None:
        """Keep the entries of highest reconstruction score: ``keep`` ``[B, H, N]`` where the cache chose them
        (adaptive budgets), else ``budget`` per head; all of them when no more than the budget is held."""
        if keep is not None:
            self.hold_ragged(*self.held(), keep)
        elif self.peak is not None and self.stored > self.capacity_now():
            self.step_scores, self.compressing = self.peak, True
            try:
                super().update(self.key_buffer[:, :, :0], self.value_buffer[:, :, :0])
            finally:
                self.compressing = False
        self.peak, self.compressed = None, True

    def quota(self) -> torch.Tensor:
        """Entries each row keeps per KV head on average ``[B]``: the budget, or all its real ones."""
        return self.real_seen.clamp(max=min(self.capacity_now(), self.peak.shape[-1]))

    def real_scores(self) -> torch.Tensor:
        """The reconstruction scores ``[B, H, N]``: -1 on padding entries (a real entry scores at least 0)
        and :data:`PROTECTED` on each row's first ``sinks`` real entries and its newest ``recent``."""
        length = self.peak.shape[-1]
        column = torch.arange(length, device=self.device)
        padding = (length - self.real_seen.clamp(max=length))[:, None, None]
        protected = (column < padding + self.sinks) | (column >= length - tokens(self.recent, length))
        scores = self.peak.masked_fill(protected & (column >= padding), PROTECTED)
        return scores.masked_fill(column < padding, -1.0)


def shared_budget(layers: list[KVzipLayer]) -> list[torch.Tensor]:
    """Which entries ``[B, H, N]`` each of ``layers`` keeps when they share one budget."""
    quota = layers[0].quota() * layers[0].peak.shape[1] * len(layers)
    keeps = highest_entries([layer.real_scores() for layer in layers], quota)
    return [keep.to(layer.device) for keep, layer in zip(keeps, layers, strict=True)]


def per_head_budget(layer: KVzipLayer) -> torch.Tensor:
    """Which entries ``[B, H, N]`` ``layer`` keeps with ``budget`` per KV head (ties as when shared)."""
    scores = layer.real_scores()
    quota = layer.quota()
    return torch.cat([highest_entries([scores[:, h : h + 1]], quota)[0] for h in range(scores.shape[1])], 1)


@register_strategy("kvzip", "KVzip: keep what the model attends to while it reconstructs the context")
class KVzipCache(ScoringCache):
    """KVzip context compression (Kim et al., https://arxiv.org/abs/2505.23416).

    The cache holds every token of the prompt, as ``DynamicCache`` would. When it compresses, it runs the
    model over a reconstruction prompt (``prompt``, "repeat the previous context") followed by the context
    itself, teacher-forced, ``chunk_size`` context tokens per pass, each pass seeing the whole context, the
    prompt and its own chunk. Each context entry scores the largest attention weight any reconstruction query
    (of the query heads sharing its KV head) gives it. The cache then keeps ``budget`` entries per layer and
    KV head on average, spent where the scores are highest: across all layers and heads
    (``layer_budgets=adaptive``, the paper's choice), across the heads of each layer
    (``layer_budgets=uniform``) or ``budget`` per head (``head_budgets=uniform``). A head that attends widely
    then keeps more entries, one that looks at a few tokens fewer; uneven heads are held ragged, so that
    ``nbytes`` shows the saving. The score does not depend on any question, so a context compressed once
    answers any question asked after it (:func:`hf_kvcache.ask`). Tokens after the
    compression (questions, generated tokens) are appended.

    When: ``cache.compress_context()`` compresses what is held (:func:`hf_kvcache.ask` calls it after the
    context); otherwise the first one-token forward (the first decoding step of ``generate``) does, so the
    prompt, question included, is compressed once. Cost: the reconstruction passes feed as many tokens as the
    context again, each attending over the whole context, so compression costs about one more prefill, with
    the scores of one chunk at a time in memory. Until then the cache holds the prompt in full (and its token
    ids, counted in ``nbytes``).

    Args:
        model: the model the cache serves (its attention hooks give the reconstruction queries).
        budget: entries kept per layer and KV head, in tokens or as a fraction of the context. Default 256.
        chunk_size: context tokens per reconstruction pass. Default 512.
        head_budgets: ``'adaptive'`` (the layer's budget goes to its highest scores, whatever their head;
            attention then runs through hf-kvcache's entry point, sdpa or eager models only) or ``'uniform'``
            (``budget`` per head, any attention). Default ``'adaptive'``.
        layer_budgets: ``'adaptive'`` (one budget shared by every layer's heads; needs adaptive heads),
            ``'uniform'`` (each layer keeps ``budget`` per head on average) or ``'pyramid'`` (a fixed
            schedule: more in early layers, less in late ones, at the same total; PyramidKV,
            :func:`hf_kvcache.budget.pyramid_budgets`). Default ``'adaptive'``.
        num_sink_tokens: each row's first real tokens, kept in every head whatever they score (out of the
            budget). Default 0.
        recent: the context's newest tokens, kept in every head whatever they score (out of the budget), in
            tokens or as a fraction of the context. The text right after the context leans on them: at a
            fifth of a 4k context, ``recent=64`` lowers the continuation's perplexity by about 1 % (README).
            The paper protects nothing. Default 0.
        prompt: the instruction before the repeated context, in the tokenizer's chat template when it has one,
            else as plain text; ``None``: the context is repeated right after itself (no tokenizer needed).
            Default ``'Repeat the previous context exactly.'``.
        tokenizer: Hub id or folder of the tokenizer that writes the prompt; ``None``: the model's own
            (``model.name_or_path``). Default ``None``.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the compressed
            context bit-packed (spec ``kvzip:...+quantized:...``), keys and values alike per entry over groups
            of ``group_size`` channels after the options' ``rotation`` (an evicted entry leaves alone, so no
            scale spans entries); it takes ``nbits``, ``nbits_keys``, ``nbits_values``, ``group_size`` and
            ``rotation``. Tokens after the compression stay in full precision. ``None``: everything in full
            precision. Default ``None``.

    Example:
        >>> cache = KVzipCache(model, budget=0.25)
        >>> ask(model, tokenizer, document, ["\\nWho wrote it?"], cache=cache)
    """

    options_class = KVzipOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        if self.options.quantization is not None and self.storage_attention_off is not None:
            raise ValueError(
                "kvzip+quantized holds packed entries, which only hf-kvcache's attention entry point reads, "
                f"and it cannot serve this model: {self.storage_attention_off}; use kvzip without +quantized"
            )
        require_entry_point(self, "kvzip")

    def build_layers(self, model, layout):
        self.model_ref = weakref.ref(model)
        self.missing_ids = False
        return super().build_layers(model, layout)

    def make_layer(self, layout) -> KVzipLayer:
        return KVzipLayer(self.options, self.forward_state)

    def reset(self) -> None:
        super().reset()
        self.missing_ids = False

    def scoring_layers(self) -> list[KVzipLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVzipLayer)]

    def _open(self) -> list[KVzipLayer]:
        """The scoring layers while the prompt is still held uncompressed (none once compressed)."""
        layers = self.scoring_layers()
        return [] if not layers or layers[0].reconstructing or layers[0].compressed else layers

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        if query_length == 1 and self._open():
            self.compress_context()
        super().observe_forward(attention_mask, query_length)

    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        layers = self._open()
        if not layers:
            return
        held = layers[0].context_ids
        if input_ids is None:  # embeddings: the context cannot be repeated; compress_context says so
            self.missing_ids, ids = True, held
        elif held is None:
            ids = input_ids.detach().clone()
        else:
            check_batch(layers[0], held, input_ids)
            ids = torch.cat([held, input_ids.to(held.device)], dim=-1)
        layers[0].context_ids = ids  # one copy: the first layer holds the ids for the cache

    @torch.no_grad()
    def compress_context(self) -> None:
        """Score the held context by reconstruction and keep each layer's budget; afterwards tokens are
        appended. Does nothing once compressed; keeps everything when no more than the budget is held."""
        layers = self._open()
        if not layers:
            return
        keeps = [None] * len(layers)
        if layers[0].stored > layers[0].capacity_now():
            self._reconstruct(layers[0])
            if self.options.layer_budgets == "adaptive":
                keeps = shared_budget(layers)
            elif self.options.head_budgets == "adaptive":
                keeps = [shared_budget([layer])[0] for layer in layers]
            elif self.options.quantization is not None:  # packed entries live in the ragged store
                keeps = [per_head_budget(layer) for layer in layers]
        for layer, keep in zip(layers, keeps, strict=True):
            layer.compress(keep)
            layer.context_ids = None

    def _reconstruct(self, first: KVzipLayer) -> None:
        model = self.model_ref()
        if model is None:
            raise RuntimeError("kvzip cannot compress: the model this cache was built for no longer exists")
        ids = first.context_ids
        if self.missing_ids or ids is None or ids.shape[-1] != first.seen:
            fed = "embeddings (inputs_embeds)" if self.missing_ids else "tokens whose ids it did not see"
            raise ValueError(
                f"kvzip repeats the context's token ids to score it, but it was fed {fed}; feed it input_ids"
            )
        prompt = prompt_ids(self.options.prompt, self.options.tokenizer, model, ids.device)
        reconstruct(model, self, self.scoring_layers(), ids, first.real_seen, prompt, self.options.chunk_size)
