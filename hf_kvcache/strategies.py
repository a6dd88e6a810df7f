"""Imports every built-in strategy module so that each registers itself."""

from hf_kvcache import (
    full,  # noqa: F401
    heavy_hitter,  # noqa: F401
    quantized,  # noqa: F401
    sliding_window,  # noqa: F401
)
