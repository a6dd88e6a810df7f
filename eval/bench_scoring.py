"""Score-based eviction at equal memory: H2O, TOVA and SnapKV against a sliding window, embedded defaults.

    python eval/bench_scoring.py [--out eval/results/scoring]

Every cache holds 256 tokens per layer and KV head (12.5 % of the 2048-token stream):
1. streaming perplexity over 2048 tokens, chunks of 16, and the bytes held at the end;
2. passkey retrieval at 1024 and 2048 tokens, needle at 5 depths (prompts fed in chunks of 512).
Runs through the harness, so results are resumable and land as results.json/.csv/.md plus plots.
"""

import argparse

from hf_kvcache.evaluation.harness import CompareSettings, run_compare
from hf_kvcache.evaluation.passkey import PasskeyOptions
from hf_kvcache.evaluation.report import markdown_table, summarize, table_columns, write_reports

STRATEGIES = [
    "full",
    "sliding-window:window_length=256,num_sink_tokens=4",
    "heavy-hitter:heavy_budget=128,recent_budget=128",
    "tova:budget=256",
    "snapkv:budget=256,window_size=32,kernel_size=7",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="eval/results/scoring")
    args = parser.parse_args()
    settings = CompareSettings(
        max_tokens=2048,
        chunk_size=16,
        metrics=("perplexity", "memory", "passkey"),
        metric_options={"passkey": PasskeyOptions(lengths=(1024, 2048))},
    )
    records = run_compare(STRATEGIES, settings, args.out)
    write_reports(records, args.out)
    print(markdown_table(summarize(records), table_columns(records)))


if __name__ == "__main__":
    main()
