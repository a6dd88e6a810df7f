"""From a quantization calibration's measured costs to each layer's code widths and clipping.

A calibration record (:mod:`hf_kvcache.calibration`) holds, for keys and for values, each layer's cost at
every width it measured: today :data:`WIDTHS`, (2, 3, 4) in files made before 8-bit codes were measured. The
allocation chooses among the widths a record holds, so older files keep working and never get 8-bit codes.
"""

from __future__ import annotations

from hf_kvcache.strategies.ranges import clipping_option

WIDTHS = (2, 3, 4, 8)
CLIPPED = "kl_divergence_mse"  # the record's costs with clipping='mse', under clipping='calibrated'


def measured_widths(record: dict) -> tuple[int, ...]:
    """The code widths the record measured, narrowest first."""
    return tuple(sorted(int(width) for width in record["kl_divergence"]["keys"]))


def allocate_widths(record: dict, mean_bits: float) -> list[tuple[int, int]]:
    """Per layer ``(key width, value width)`` at a mean of at most ``mean_bits`` bits per code.

    Greedy, on each width's cost with the better clipping where the record measured both
    (:func:`least_costs`): everything starts at the narrowest width; the step (one layer's keys or values to
    the next width the record measured) that removes the most error per added bit is taken until the next
    would pass the mean.
    """
    errors, ladder = least_costs(record), measured_widths(record)
    layers = record["geometry"]["num_layers"]
    widths = {(kind, i): 0 for kind in ("keys", "values") for i in range(layers)}  # index into ladder
    budget, spent = mean_bits * 2 * layers, ladder[0] * 2 * layers

    def gain(item: tuple[str, int]) -> float:
        kind, layer = item
        now, nxt = ladder[widths[item]], ladder[widths[item] + 1]
        return (errors[kind][str(now)][layer] - errors[kind][str(nxt)][layer]) / (nxt - now)

    while True:
        steps = [item for item in widths if widths[item] + 1 < len(ladder)]
        steps = [item for item in steps if spent + ladder[widths[item] + 1] - ladder[widths[item]] <= budget]
        if not steps:
            break
        best = max(steps, key=gain)
        spent += ladder[widths[best] + 1] - ladder[widths[best]]
        widths[best] += 1
    return [(ladder[widths["keys", i]], ladder[widths["values", i]]) for i in range(layers)]


def least_costs(record: dict) -> dict[str, dict[str, list[float]]]:
    """Per kind and width, each layer's cost: without clipping, or with it where the record measured that
    (``clipping='calibrated'``) and it costs less."""
    plain, clipped = record["kl_divergence"], record.get(CLIPPED, record["kl_divergence"])
    return {
        kind: {width: list(map(min, plain[kind][width], clipped[kind][width])) for width in plain[kind]}
        for kind in plain
    }


def allocate_clipping(record: dict, widths: list[tuple[int, int]]) -> list[str]:
    """Per layer, the ``clipping`` option under which its keys and values at ``widths`` cost the least."""
    plain, clipped = record["kl_divergence"], record[CLIPPED]

    def better(kind: str, width: int, layer: int) -> str:
        return "mse" if clipped[kind][str(width)][layer] < plain[kind][str(width)][layer] else "none"

    return [
        clipping_option(better("keys", keys, layer), better("values", values, layer))
        for layer, (keys, values) in enumerate(widths)
    ]


def describe_allocation(record: dict, mean_bits: float) -> str:
    """One line: the widths per layer at ``mean_bits``, and the clipping where the record chooses it."""
    widths = allocate_widths(record, mean_bits)
    line = f"calibrated_bits={mean_bits}: (keys, values) per layer {widths}"
    return line + (f", clipping per layer {allocate_clipping(record, widths)}" if CLIPPED in record else "")


def layer_scales(scales: str, key_nbits: int, value_nbits: int) -> str:
    """The ``scales`` option of a layer with these widths: float8 zero points are too coarse for 8-bit
    codes (:func:`~hf_kvcache.strategies.packing.check_width`), so a layer holding any keeps its scales in the
    model's dtype (0.25 bit per entry more at group size 64)."""
    return "model" if scales == "float8" and 8 in (key_nbits, value_nbits) else scales
