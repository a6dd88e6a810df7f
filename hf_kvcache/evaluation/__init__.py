"""Evaluation: models, corpora and the measurements the harness runs."""

from hf_kvcache.evaluation.corpus import EMBEDDED_CORPUS, load_corpus
from hf_kvcache.evaluation.model import EMBEDDED_MODEL, load_model
from hf_kvcache.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["EMBEDDED_CORPUS", "EMBEDDED_MODEL", "PerplexityResult", "load_corpus", "load_model", "perplexity"]
