"""The one orchestrator behind ``compare`` and ``scale``: units of work, resume, records, the accelerate split
and progress, whatever is measured.

A :class:`Job` names the records it wants, each by a key ``(strategy, metric, fingerprint)`` where the
fingerprint hashes every setting the record depends on; groups the pending keys into units one process
measures whole; and measures a unit on a loaded model. :func:`run_job` does the rest:

* records already in ``results.json`` under the same key are reused (unless ``force``), so a killed run loses
  nothing finished and a rerun measures only what is missing;
* each finished record is written at once, atomically;
* under ``accelerate launch`` every process loads the model on its own device and takes every N-th unit; the
  main process gathers the others' records and writes them all, in the order one process would have;
* a progress bar counts the job's units of work (prompt tokens through the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_kvcache.evaluation.distributed import Workers, merge_records
from hf_kvcache.evaluation.records import ResultStore, environment, new_record

RecordKey = tuple[str, str, str]  # (canonical strategy spec, metric name, fingerprint)


@dataclass(frozen=True)
class DataSource:
    """The model and text a job measures on, as the CLI names them (``None``: the embedded defaults)."""

    model: str | None = None
    dataset: str | None = None
    text_file: str | None = None
    split: str = "test"
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Measured:
    """What a unit produced for one key: the spec as the user wrote it, the values and the settings behind the
    key's fingerprint."""

    key: RecordKey
    spec: str
    values: dict
    settings: dict


class Job:
    """What to measure; see the module docstring. Subclasses implement every method but :meth:`work`."""

    label: str = "job"

    def wanted(self) -> list[RecordKey]:
        """Every record the job returns, in the order one process writes them."""
        raise NotImplementedError

    def units(self, pending: list[RecordKey]) -> list[list[RecordKey]]:
        """The pending keys, grouped into units of work that one process measures whole."""
        raise NotImplementedError

    def prepare(self, model: Any, tokenizer: Any, text: str) -> None:
        """Get ready to measure on the loaded ``model`` and ``text`` (tokenize, check lengths)."""
        raise NotImplementedError

    def work(self, unit: list[RecordKey]) -> int:
        """Progress units :meth:`measure` will report for ``unit`` (prompt tokens through the model)."""
        return 0

    def describe(self, unit: list[RecordKey]) -> str:
        """A short label of ``unit`` for the progress bar: its strategy (or how many) and its metrics."""
        strategies = list(dict.fromkeys(strategy for strategy, _, _ in unit))
        metrics = " ".join(dict.fromkeys(metric for _, metric, _ in unit))
        who = strategies[0] if len(strategies) == 1 else f"{len(strategies)} strategies"
        return f"{who} {metrics}"

    def measure(self, unit: list[RecordKey], tick: Callable[[int], None]) -> list[Measured]:
        """Measure ``unit``; call ``tick(n)`` as work is done."""
        raise NotImplementedError


def run_job(
    job: Job,
    source: DataSource,
    out_dir: str | Path,
    force: bool = False,
    device_map: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure what ``job`` wants and is not in ``out_dir/results.json`` yet; return the records it wants."""
    from tqdm.auto import tqdm

    from hf_kvcache.evaluation.corpus import load_corpus
    from hf_kvcache.evaluation.model import load_model

    store = ResultStore(Path(out_dir) / "results.json")
    wanted = job.wanted()
    pending = [key for key in wanted if force or store.find(*key) is None]
    workers = Workers()
    workers.wait()  # every process has read results.json before the main process writes to it
    if pending:
        if source.text_file is not None and not Path(source.text_file).is_file():
            raise FileNotFoundError(f"text file {source.text_file!r} does not exist")
        text = load_corpus(source.text_file or source.dataset, split=source.split)
        device = "auto" if device_map == "auto" else workers.device(source.device)
        model, tokenizer = load_model(source.model, source.dtype, device)
        job.prepare(model, tokenizer, text)
        env = environment(model, source.model)
        mine = workers.share(job.units(pending))
        produced = []
        total = sum(job.work(unit) for unit in mine)
        with tqdm(
            total=total, desc=job.label, unit="tok", disable=not progress or not workers.is_main
        ) as bar:
            for unit in mine:
                bar.set_postfix_str(job.describe(unit))
                for item in job.measure(unit, bar.update):
                    strategy, metric, _ = item.key
                    record = new_record(strategy, item.spec, metric, item.values, item.settings, env)
                    produced.append(record)
                    if workers.is_main:  # saved as soon as it exists; the others' come when all are done
                        store.put(record)
        order = {key: index for index, key in enumerate(wanted)}

        def position(record: dict) -> tuple[bool, int]:
            key = (record["strategy"], record["metric"], record["fingerprint"])
            return key in order, order.get(key, -1)

        store = merge_records(store, workers, produced, position)
    found = (store.find(*key) for key in wanted)
    return [record for record in found if record is not None]
