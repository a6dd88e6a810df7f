"""Every plot compare, scale and ruler write shows whole labels: no text extends past the saved image, also
for the longest default strategy specs."""

import matplotlib
import pytest

from hf_kvcache.evaluation.harness import DEFAULT_STRATEGIES
from hf_kvcache.evaluation.metric import get_metric
from hf_kvcache.evaluation.report import summarize, write_pareto_plot
from hf_kvcache.evaluation.ruler import RULER_TASKS
from hf_kvcache.evaluation.scale import write_scale_plot
from hf_kvcache.registry import canonical_spec

matplotlib.use("Agg")

SPECS = [canonical_spec(spec) for spec in DEFAULT_STRATEGIES]  # the longest spellings of the defaults


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure saved while the test runs, checked at save time: the extents of its texts against the
    image area it is saved with."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    checked, save, drawn = [], Figure.savefig, []
    draw_text = Text.draw

    def record_drawn(text, renderer):
        drawn.append(text)
        return draw_text(text, renderer)

    def savefig(figure, path, **kwargs):
        renderer = figure.canvas.get_renderer()
        drawn.clear()
        monkeypatch.setattr(Text, "draw", record_drawn)
        figure.draw(renderer)  # the texts really drawn: ticks outside the view are not
        monkeypatch.setattr(Text, "draw", draw_text)
        area = figure.bbox  # what is saved: the figure, or with bbox_inches="tight" what its artists cover
        if kwargs.get("bbox_inches") == "tight":
            padded = figure.get_tightbbox(renderer).padded(kwargs.get("pad_inches", 0.1))
            area = padded.transformed(figure.dpi_scale_trans)
        for text in drawn:
            if not text.get_visible() or not text.get_text().strip():
                continue
            extent = text.get_window_extent(renderer)
            inside = extent.x0 >= area.x0 - 1 and extent.x1 <= area.x1 + 1
            inside &= extent.y0 >= area.y0 - 1 and extent.y1 <= area.y1 + 1
            assert inside, f"{path}: {text.get_text()!r} at {extent} is cut by the image {area}"
        assert drawn, f"{path}: no text drawn"
        checked.append(str(path))
        return save(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return checked


def record(spec: str, metric: str, values: dict) -> dict:
    return {"strategy": spec, "spec": spec, "metric": metric, "values": values, "environment": {}}


def test_compare_plots_show_whole_labels(tmp_path, saved_figures):
    records = []
    for index, spec in enumerate(SPECS):
        speed = {"decode_tokens_per_s": 10.0 + index, "decode_tokens_per_s_min": 9.0}
        records.append(record(spec, "speed", {**speed, "decode_tokens_per_s_max": 20.0}))
        cells = [
            {"length": n, "depth": d, "correct": 1, "trials": 1} for n in (1024, 2048) for d in (0.1, 0.9)
        ]
        records.append(record(spec, "passkey", {"cells": cells, "accuracy": 1.0}))
        records.append(
            record(
                spec, "memory", {"cache_bytes": 1e6, "ratio_to_full": 1 / (index + 1), "peak_memory_bytes": 0}
            )
        )
        records.append(record(spec, "perplexity", {"perplexity": 20.0 + index}))
        ruler = [
            {"task": t, "length": n, "correct": 1, "trials": 2, "partial": 0.5}
            for t in RULER_TASKS
            for n in (1, 4)
        ]
        records.append(record(spec, "ruler", {"cells": ruler}))
    for name in ("speed", "passkey", "ruler"):
        get_metric(name)().plots([r for r in records if r["metric"] == name], tmp_path)
    write_pareto_plot(summarize([r for r in records if r["metric"] in ("memory", "perplexity")]), tmp_path)
    assert sorted(p.rsplit("/", 1)[1] for p in saved_figures) == sorted(
        ["decode_speed.png", "passkey.png", "ruler.png", "pareto.png"]
    )


def test_the_scale_plot_shows_whole_labels(tmp_path, saved_figures):
    records = []
    for index, spec in enumerate(SPECS):
        for length in (1024, 2048, 4096):
            spread = {"median": 50.0 + index, "min": 40.0, "max": 60.0}
            values = dict(peak_memory_bytes=spread, prefill_seconds=spread, decode_ms_per_token=spread)
            records.append(
                record(spec, "scale", {"length": length, "held_bytes": length * (index + 1), **values})
            )
    write_scale_plot(records, tmp_path)
    assert saved_figures and saved_figures[0].endswith("scale.png")
