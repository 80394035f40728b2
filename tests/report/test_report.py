"""`peftkit report` on a comparison's records: seeds aggregated, the Pareto frontier, the
table, CSV, JSON, HTML and plots (peftkit.report)."""

from __future__ import annotations

import json

import pytest

from peftkit.compare import append_run
from peftkit.record import CellRecord
from peftkit.report.rows import aggregate, pareto
from peftkit.report.write import write_report
from test_compare import fake


def test_report_aggregates_seeds_and_finds_the_pareto_frontier(tmp_path):
    records = [fake("full", 0, 0.90, 10000), fake("full", 1, 0.88, 10000), fake("lora", 0, 0.86, 100),
               fake("probe", 0, 0.70, 10), fake("bad", 0, 0.60, 1000),
               {"strategy": "prefix-tuning", "seed": 0, "status": "failed", "error": "error: prefix-tuning cannot train X"}]
    ordered = aggregate([CellRecord.model_validate(r) for r in records], "accuracy")
    assert [r.strategy for r in ordered] == ["full", "lora", "probe", "bad"]  # best first
    rows = {r.strategy: r for r in ordered}
    assert rows["lora"].metric_std is None and rows["lora"].metric_text == "0.8600"  # one seed: no made-up spread
    assert rows["full"].n == 2 and rows["full"].metric_mean == pytest.approx(0.89)
    assert rows["full"].metric_std == pytest.approx(0.0141421, abs=1e-6)
    assert rows["full"].estimate_ratio == pytest.approx(0.5)
    assert [r.strategy for r in pareto(list(rows.values()))] == ["probe", "lora", "full"]
    by_loss = aggregate([CellRecord.model_validate(fake(*row)) for row in (("big", 0, 1.2, 1000), ("small", 0, 1.5, 10),
                                                                           ("worse", 0, 1.9, 100))],
                        "accuracy", greater_is_better=False)  # read the values as a loss: lower is better
    assert [r.strategy for r in pareto(by_loss, greater_is_better=False)] == ["small", "big"]
    for record in records:
        append_run(tmp_path, CellRecord.model_validate(record))
    paths = write_report(tmp_path)
    assert {p.name for p in paths} >= {"results.md", "results.csv", "results.json", "results.html", "metric_vs_params.png"}
    text = (tmp_path / "results.md").read_text()
    assert "0.8900 ± 0.0141" in text and "| 0.8600 | 1 |" in text
    assert "Command: `peftkit compare --strategies full,lora`" in text and "Date: 2026-11-28" in text
    assert "Checkpoint: best accuracy on a held-out slice of the training data; the validation split scored once" in text
    assert "Head input: mean pooling of the last hidden states (pooling: mean)" in text  # one reading, shown
    assert "- prefix-tuning (seed 0): error: prefix-tuning cannot train X" in text  # refusals are reported too
    assert "data:image/png;base64," in (tmp_path / "results.html").read_text()
    assert "accuracy (mean ± std)" in text


def test_an_open_ended_instruction_table_leads_with_rouge_l(tmp_path):
    for strategy, scores in (("none", (0.0, 0.19, 10.9)), ("lora", (0.01, 0.25, 6.0)), ("full", (0.02, 0.22, 5.5))):
        record = fake(strategy, 0, 0.0, 100)
        record.update(task_kind="sft", config={"model": "tiny-llama", "task": "dolly"},
                      metrics=dict(zip(("exact_match", "rouge_l", "perplexity"), scores)))
        append_run(tmp_path, CellRecord.model_validate(record))
    write_report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| rouge_l (one seed) | exact_match | perplexity |" in text
    assert [row["strategy"] for row in json.loads((tmp_path / "results.json").read_text())] == ["lora", "full", "none"]
    assert not (tmp_path / "generations.md").exists()  # no run saved generations


def test_a_one_seed_table_says_so_and_its_legend_sits_below_the_points(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftkit.report.plots import _legend_below, write_plots
    from peftkit.report.tables import markdown

    rows = aggregate([CellRecord.model_validate(fake("full", 0, 0.90, 10000)),
                      CellRecord.model_validate(fake("lora", 0, 0.86, 100))], "accuracy")
    text = markdown(rows, "accuracy", "t")
    assert "accuracy (one seed)" in text and "±" not in text
    assert (tmp_path / "metric_vs_params.png") in write_plots(rows, "accuracy", tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1], [1], "o", label="a point")
    _legend_below(ax)
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # outside the axes: it hides nothing


def test_point_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftkit.report.plots import label_offsets

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(2.2e5, 0.861), (2.3e5, 0.8605), (3.3e5, 0.8647), (1e7, 0.80)]
    labels = ["adapter-houlsby", "adapter-pfeiffer", "qlora", "full"]
    ax.scatter(*zip(*points))
    ax.set_xscale("log")
    offsets = label_offsets(ax, points, labels)
    plt.close(fig)
    assert offsets[3] == (6.0, 4.0) and offsets[2] == (6.0, 4.0)  # labels with room stay beside their point
    assert offsets[1][1] < offsets[0][1]  # the lower of two crowded labels moves down, clear of the other
