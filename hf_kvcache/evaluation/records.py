"""``results.json``: the records a harness run writes, how each is fingerprinted, and where it was measured.

A record is one strategy's figures for one metric. It is reused by a later run only under the same
``fingerprint``: a hash of every setting it depends on (model, data, token counts, dtype, device, the metric's
options). The file is rewritten atomically after each record, so a killed run loses nothing already finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

SCHEMA_VERSION = 1


def fingerprint_of(settings: dict) -> str:
    """A short stable hash of the JSON-ready ``settings`` a record depends on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def new_record(strategy: str, spec: str, metric: str, values: dict, settings: dict, env: dict) -> dict:
    """One ``results.json`` record, fingerprinted from ``settings`` and stamped with the time it finished."""
    return {
        "strategy": strategy,
        "spec": spec,
        "metric": metric,
        "values": values,
        "settings": settings,
        "environment": env,
        "fingerprint": fingerprint_of(settings),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def record_key(record: dict) -> tuple[str, str, str]:
    """What identifies a record: ``(strategy, metric, fingerprint)``."""
    return record["strategy"], record["metric"], record["fingerprint"]


class ResultStore:
    """``results.json``: a list of records, rewritten atomically after each one.

    A file that is not what this package writes (truncated, edited by hand, another schema) is refused with an
    error naming the file and the place, and is never overwritten.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = self._read()

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{self.path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                "repair it or move it away: it was left as it is and nothing was measured"
            ) from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{self.path} has schema {found}, expected {SCHEMA_VERSION}; it was left as it is"
            )
        records = data.get("records")
        keys = ("strategy", "metric", "fingerprint", "values")
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(k in r for k in keys) for r in records
        ):
            raise ValueError(
                f"{self.path} has no list of records with {list(keys)} each; it was left as it is"
            )
        return records

    def find(self, strategy: str, metric: str, fingerprint: str) -> dict | None:
        """The record of that key, or ``None``."""
        return next((r for r in self.records if record_key(r) == (strategy, metric, fingerprint)), None)

    def put(self, record: dict) -> None:
        """Add ``record``, replacing one of the same key, and write the file."""
        self.records = [r for r in self.records if record_key(r) != record_key(record)]
        self.records.append(record)
        self.write()

    def reorder(self, key) -> None:
        """Sort the records by ``key`` (stable) and write them."""
        self.records = sorted(self.records, key=key)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"schema_version": SCHEMA_VERSION, "records": self.records}, indent=2)
        handle, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".results-", suffix=".json")
        with os.fdopen(handle, "w") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, self.path)


def environment(model, model_name: str | None) -> dict:
    """Where a record was measured: the model (``model_name`` as the user named it; ``None``: the embedded
    default), dtype, device, threads, library versions, hardware."""
    import transformers

    import hf_kvcache
    from hf_kvcache.evaluation.model import EMBEDDED_MODEL

    device = model.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "model": model_name or f"{EMBEDDED_MODEL} (embedded GGUF)",
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(device),
        "hardware": f"{hardware}, {os.cpu_count()} CPU cores",
        # How torch's CPU threads wait decides how much other processes slow (and scatter) a timing.
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "versions": {
            "hf_kvcache": hf_kvcache.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
