"""The continuation metric: perplexity of the text after a held context, against a cache-free forward over
the same tokens, and the bytes held after a compressed context."""

import json
from pathlib import Path

import torch

from hf_kvcache.cli import main
from hf_kvcache.evaluation import load_model
from hf_kvcache.evaluation.corpus import corpus_token_ids


def test_continuation_perplexity_is_the_cache_free_forwards_and_kvzip_holds_its_budget(
    tiny_model_dir, filler_file, tmp_path
):
    spec = "kvzip:budget=0.25,prompt=none"
    argv = ["compare", "--model", tiny_model_dir, "--text-file", filler_file, "--device", "cpu"]
    argv += ["--out", str(tmp_path), "--metrics", "continuation", "--continuation-context", "64"]
    argv += ["--continuation-tokens", "32", "--chunk-size", "8", "--strategies", "full", spec]
    assert main(argv) == 0
    records = {r["spec"]: r["values"] for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    ids = corpus_token_ids(tokenizer, Path(filler_file).read_text(encoding="utf-8"), 96)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    # Continuation tokens 65..95 are scored, each predicted from everything before it.
    nll = torch.nn.functional.cross_entropy(logits[64:95], ids[0, 65:96])
    assert records["full"]["num_tokens"] == 31
    assert abs(records["full"]["mean_nll"] - nll.item()) < 1e-4
    assert records[spec]["context_bytes"] < 0.3 * records["full"]["context_bytes"]
    assert "continuation ppl" in (tmp_path / "results.md").read_text()
