"""``head_budgets=adaptive`` (AdaKV) for strategies that rank entries by a priority of their own.

AdaKV (https://arxiv.org/abs/2407.11550) spends a layer's budget where the scores are highest, whatever the
head: a head that attends widely keeps more entries, one that looks at a few tokens fewer. Heads then hold
different numbers of entries, which only a ragged store holds without padding
(:mod:`hf_kvcache.strategies.ragged`). A ragged store is filled once: so under adaptive budgets the strategy
compresses the *context* once, as AdaKV does, instead of evicting at every step.

* The prompt is held whole, as ``DynamicCache`` holds it, until it ends: at the first one-token forward (the
  first decoding step of ``generate``), or when ``cache.compress_context()`` is called (the compress-first
  protocol: :func:`hf_kvcache.ask`, ``--ruler-protocol compress-first``).
* Then each layer ranks its held entries by the strategy's own :meth:`EvictingLayer.priority`, the protected
  ones (sinks, recent) first and padding last, and keeps ``budget`` times its KV heads of them, wherever they
  are (``layer_budgets=adaptive``: one budget for every layer's heads together).
* Tokens after that are appended uncompressed (the *tail*), as after SnapKV's prompt.
"""

from __future__ import annotations

import sys

import torch

from hf_kvcache.budget import tokens
from hf_kvcache.strategies.ragged import RaggedContext, RaggedEntries, highest_entries

HEAD_BUDGETS = ("uniform", "adaptive")


def check_head_budgets(options, strategy: str) -> None:
    """For an options dataclass with a ``head_budgets`` field (and maybe ``layer_budgets``,
    ``quantization``)."""
    if options.head_budgets not in HEAD_BUDGETS:
        raise ValueError(f"head_budgets must be one of {list(HEAD_BUDGETS)}, got {options.head_budgets!r}")
    if getattr(options, "layer_budgets", None) == "adaptive" and options.head_budgets != "adaptive":
        raise ValueError(
            "layer_budgets=adaptive shares one budget among every head of every layer, which needs "
            f"head_budgets=adaptive, got head_budgets={options.head_budgets!r}"
        )
    if options.head_budgets == "adaptive" and getattr(options, "quantization", None) is not None:
        raise ValueError(
            f"{strategy}:head_budgets=adaptive holds its compressed context ragged, in full precision; it "
            f"does not compose with +quantized (use {strategy}:head_budgets=uniform+quantized:..., or "
            "kvzip:...+quantized:..., whose ragged store is packed)"
        )


class CompressedContext(RaggedContext):
    """Mixed into an evicting layer (before it): holds the prompt whole, then keeps the entries the cache
    chooses by :meth:`context_scores` in a ragged store, and appends what comes after (see the module)."""

    # Attention over the ragged store runs through hf-kvcache's entry point, which must be installed.
    reads_storage = True

    def reset(self) -> None:
        super().reset()
        self.context_done = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.ragged = RaggedEntries()

    @property
    def context_open(self) -> bool:
        """Whether the layer holds a prompt that has not been compressed yet."""
        return self.is_initialized and not self.context_done

    def capacity(self, new: int) -> int:
        return sys.maxsize  # nothing is evicted by an update: the prompt is held, then the tail grows

    def get_max_length(self) -> int:
        return -1

    def serves_attention(self, new: int) -> bool:
        return False  # no decoding step scores in place: the compression reads the held prompt

    def capacity_now(self) -> int:
        """Entries per KV head the context keeps on average: what the strategy would keep of it."""
        return super().capacity(0)

    def context_priority(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The strategy's priorities ``[B, H, N]`` of the held prompt (age order); by default its
        :meth:`~hf_kvcache.strategies.eviction.EvictingLayer.priority`."""
        batch, heads, stored, _ = keys.shape
        return self.priority(
            keys, values, torch.arange(stored, device=self.device).expand(batch, heads, stored)
        )

    def context_quota(self) -> torch.Tensor:
        """Entries each row keeps over the layer's KV heads ``[B]``: the budget per head, or all its real
        entries when it has fewer."""
        return self.cached_real.clamp(max=self.capacity_now()) * self.key_buffer.shape[1]

    def context_scores(self) -> torch.Tensor:
        """The held prompt's priorities ``[B, H, N]`` in age order: the strategy's own, infinity for the
        protected entries (each row's first ``sinks`` real entries and the newest ``recent``), minus infinity
        for padding."""
        keys, values = self.held()
        stored = keys.shape[-2]
        entry = torch.arange(stored, device=self.device)
        scores = self.context_priority(keys, values).float()
        first_real = (stored - self.cached_real)[:, None]  # [B, 1]: padding sits first
        recent = entry >= stored - tokens(self.recent, self.seen)
        protected = (entry < first_real + self.sinks) | recent
        scores = scores.masked_fill(protected[:, None], float("inf"))
        return scores.masked_fill((entry < first_real)[:, None], float("-inf"))

    def compress(self, keep: torch.Tensor | None) -> None:
        """Hold the entries ``keep`` ``[B, H, N]`` of the prompt ragged (``None``: keep the slots as they
        are, nothing being over the budget); afterwards tokens are appended."""
        if keep is not None:
            self.hold_ragged(*self.held(), keep.to(self.device))
            # What else the slots held (H2O's accumulated attention) described the prompt's entries.
            for declared in self.declared("slot"):
                tensor = getattr(self, declared.name)
                if tensor is not None:
                    setattr(self, declared.name, tensor[:, :, :0].clone())
        self.context_done = True

    # A strategy that scores from attention needs this forward's queries until the prompt is compressed.
    def wants_queries(self, new: int) -> bool:
        return not self.context_done and super().wants_queries(new)

    def observe_attention(self, keys, new_valid, real_in_full, evicting: bool) -> None:
        if not self.context_done:  # afterwards no queries are captured, and nothing is scored
            super().observe_attention(keys, new_valid, real_in_full, evicting)


class CompressedContextCache:
    """Mixed into an :class:`~hf_kvcache.strategies.eviction.EvictionCache` (before it) whose layers may be
    :class:`CompressedContext`: compresses them at the end of the prompt, or when asked."""

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        if query_length == 1:  # the first decoding step: the prompt is over
            self.compress_context()
        super().observe_forward(attention_mask, query_length)

    @torch.no_grad()
    def compress_context(self) -> None:
        """Compress the held prompt now (what the first one-token forward would do), so that the context is
        compressed before any question is appended. Does nothing where nothing is held for it."""
        layers = [
            layer for layer in self.layers if isinstance(layer, CompressedContext) and layer.context_open
        ]
        if not any(layer.stored > layer.capacity_now() for layer in layers):
            keeps = [None] * len(layers)
        elif getattr(self.options, "layer_budgets", None) == "adaptive":
            quota = sum(layer.context_quota().to(layers[0].device) for layer in layers)
            keeps = highest_entries([layer.context_scores() for layer in layers], quota)
        else:
            keeps = [highest_entries([layer.context_scores()], layer.context_quota())[0] for layer in layers]
        for layer, keep in zip(layers, keeps, strict=True):
            layer.compress(keep)
