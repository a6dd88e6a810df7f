"""Data-parallel harness runs: ``accelerate launch --num_processes N -m hf_kvcache.cli compare ...``.

Every process loads the model on its own device and takes every N-th unit of the pending work (a (strategy,
metric) pair, or a whole batch for metrics that measure strategies together); the main process gathers the
records of all and alone writes ``results.json``, in the order a single process would have written them.
Without ``accelerate launch`` (one process) nothing changes.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys

from hf_kvcache.evaluation.metric import Metric

GATHER_TIMEOUT = datetime.timedelta(days=7)  # how long a process waits for the others' records


class Workers:
    """This process's place among the processes of an ``accelerate launch`` run (or alone)."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise RuntimeError(
                    "this run has several processes (WORLD_SIZE > 1), which hf-kvcache coordinates with "
                    "accelerate: pip install accelerate"
                ) from None
            import torch

            # On a machine without GPUs the processes meet over gloo, which PartialState needs told. A process
            # whose units are done waits at the gather for the slowest one, which can take hours (one
            # RULER record at 10 trials: 35 min on 2 CPU cores); the default 30-minute timeout killed such
            # runs. A process that fails ends the launch, so waiting long hangs nothing.
            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=GATHER_TIMEOUT)
        self.index = 0 if self.state is None else self.state.process_index
        self.count = 1 if self.state is None else self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: str | None) -> str | None:
        """The device this process loads the model on: the one asked for, else its own accelerator."""
        if requested is not None or self.state is None or self.state.device.type == "cpu":
            return requested
        return str(self.state.device)

    def share(self, units: list) -> list:
        """This process's units of ``units``: every ``count``-th, starting at its index (said on stderr when
        there are several processes)."""
        mine = units[self.index :: self.count]
        if self.count > 1:
            print(
                f"hf-kvcache: process {self.index} of {self.count} measures {len(mine)} of {len(units)} "
                "units",
                file=sys.stderr,
                flush=True,
            )
        return mine

    def gather(self, items: list) -> list:
        """Everyone's ``items``, concatenated in process order (on every process)."""
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def relaunch_with_accelerate(num_processes: int, argv: list[str]) -> int:
    """Run ``hf-kvcache <argv>`` in ``num_processes`` processes (``accelerate launch``); its exit status."""
    if num_processes < 1:
        raise SystemExit(f"error: --num-processes must be at least 1, got {num_processes}")
    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit(
            f"error: --num-processes {num_processes} runs the work in parallel through accelerate, which is "
            "not installed: pip install accelerate (or pip install 'hf-kvcache[eval]'); nothing was run"
        )
    # --multi_gpu starts the processes through torchrun, also on a machine without GPUs (accelerate's --cpu
    # would start only one); each process then finds its device, or the CPU.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
    ]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.call([*command, "-m", "hf_kvcache.cli", *argv])


def work_units(todo: list[tuple[str, str]], metrics: dict[str, Metric]) -> list[list[tuple[str, str]]]:
    """The pending ``(strategy, metric)`` pairs grouped into units one process measures whole: every pair of
    the metrics that share a strategy's perplexity stream (computed once), all pairs of a metric that measures
    strategies together (interleaved timings), and each other pair alone."""
    units, streams = [], {}
    for name, metric in metrics.items():
        specs = [spec for spec, pending_name in todo if pending_name == name]
        if specs and type(metric).measure_many is not Metric.measure_many:
            units.append([(spec, name) for spec in specs])
            continue
        for spec in specs:
            if not metric.uses_stream:
                units.append([(spec, name)])
            elif spec in streams:
                streams[spec].append((spec, name))
            else:
                streams[spec] = [(spec, name)]
                units.append(streams[spec])
    return units


def merge_records(store, workers: Workers, produced: list[dict], order):
    """After every process measured its share: the main process adds the others' ``produced`` records to
    ``store`` (a :class:`~hf_kvcache.evaluation.harness.ResultStore`, which holds its own already) and sorts
    all by ``order``; every process then returns the store as written."""
    everything = workers.gather(produced)
    if workers.is_main:
        for record in everything[len(produced) :]:
            store.put(record)
        store.reorder(order)
    workers.wait()
    return store if workers.is_main else type(store)(store.path)
