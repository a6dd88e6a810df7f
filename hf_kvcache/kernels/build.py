"""Building the native kernels' library: compiled once per machine and CPU, cached, loaded with ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("packed_attention.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class KernelUnavailable(RuntimeError):
    """The native kernels could not be built or loaded on this machine; the message says why."""


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU that shares the cache directory.
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelUnavailable("no C++ compiler found (set $CXX, or install g++)")


def _build(target: Path) -> None:
    compiler = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a private name and rename: concurrent processes never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(built, target)


def load_library() -> ctypes.CDLL:
    """The library for this source, flags and CPU, built under ``$HF_KVCACHE_HOME/kernels/`` if missing;
    :class:`KernelUnavailable` says why not."""
    from hf_kvcache.evaluation.model import cache_home

    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_home() / "kernels" / f"packed_attention-{key}.so"
    try:
        if not target.exists():
            _build(target)
        return ctypes.CDLL(str(target))
    except OSError as error:
        raise KernelUnavailable(f"cannot build or load {target}: {error}") from None
