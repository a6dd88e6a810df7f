"""Evaluation: models, corpora, and the metrics the harness runs (a module each; importing registers them)."""

import importlib

from hf_kvcache.evaluation.corpus import EMBEDDED_CORPUS, load_corpus
from hf_kvcache.evaluation.metric import Column, Metric, get_metric, list_metrics, register_metric
from hf_kvcache.evaluation.model import EMBEDDED_MODEL, load_model
from hf_kvcache.evaluation.perplexity import PerplexityResult, perplexity

# The built-in metrics, in the order of the results table's columns; a new metric's module goes here.
BUILTIN_METRIC_MODULES = ("perplexity", "memory", "speed", "passkey", "ruler", "continuation")
for _module in BUILTIN_METRIC_MODULES:
    importlib.import_module(f"hf_kvcache.evaluation.{_module}")

__all__ = [
    "EMBEDDED_CORPUS",
    "EMBEDDED_MODEL",
    "Column",
    "Metric",
    "PerplexityResult",
    "get_metric",
    "list_metrics",
    "load_corpus",
    "load_model",
    "perplexity",
    "register_metric",
]
