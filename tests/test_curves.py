import json
import math
import random

import pytest

from echoink.analysis.curves import ema, load_metrics, metric_series, plot_training_curves
from echoink.io import JsonlError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, steps=60, with_eval=True, drop=()):
    rng = random.Random(0)
    lines = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "reward": 1.0 + step / steps,
            "rewards/accuracy": min(1.0, 0.4 + step / (2 * steps) + rng.uniform(-0.1, 0.1)),
            "rewards/format": min(1.0, 0.7 + step / (3 * steps)),
            "reward_std": 0.4 - step / (4 * steps),
            "completion_length": 180 - step + rng.uniform(-10, 10),
            "kl": 0.0005 * step,
            "loss": 0.01,
            "grad_norm": 1.0,
            "learning_rate": 1e-6,
        }
        for key in drop:
            row.pop(key, None)
        lines.append(json.dumps(row))
        if with_eval and step % 20 == 0:
            lines.append(json.dumps({"step": step, "eval/accuracy": 0.5 + step / 400}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    return width, height, len(data)


def test_plot_from_run_dir(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    out = plot_training_curves(tmp_path, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    width, height, size = _png_size(out)
    assert width > 1000 and height > 600 and size > 30_000
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["curves.png"]  # no temp file left behind


def test_plotted_lines_are_the_logged_metrics(tmp_path):
    """Every panel's raw line holds exactly the logged (step, value) pairs of its metric."""
    from echoink.analysis.curves import PANELS, load_metrics, metric_series, training_figure

    rows = load_metrics(_write_metrics(tmp_path / "metrics.jsonl"))
    figure = training_figure(rows)
    for axis, panel in zip(figure.axes, PANELS):
        key, steps, values = metric_series(rows, panel.keys)
        if key is None:
            assert not axis.lines
            continue
        raw = axis.lines[0]  # the raw series is drawn first (the EMA, when drawn, second)
        assert list(raw.get_xdata()) == list(steps) and list(raw.get_ydata()) == list(values), panel.title
        assert len(values) > 0


def test_missing_keys_still_plot(tmp_path):
    path = _write_metrics(tmp_path / "m.jsonl", steps=3, with_eval=False, drop=("kl", "reward_std"))
    out = plot_training_curves(path, tmp_path / "c.png")
    assert _png_size(out)[2] > 10_000


def test_bad_file_names_line(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", steps=3, with_eval=False)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(JsonlError, match=r"metrics\.jsonl:4"):
        plot_training_curves(tmp_path, tmp_path / "c.png")
    path.write_text('{"step": "ten", "kl": 1}\n')
    with pytest.raises(JsonlError, match=r"metrics\.jsonl:1: 'step'"):
        load_metrics(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no logged steps"):
        plot_training_curves(path, tmp_path / "c.png")
    with pytest.raises(FileNotFoundError):
        plot_training_curves(tmp_path / "nowhere", tmp_path / "c.png")


def test_metric_series_skips_missing_and_non_finite():
    rows = [{"step": 1, "kl": 0.1}, {"step": 2}, {"step": 3, "kl": None}, {"step": 4, "kl": float("nan")},
            {"step": 5, "kl": 0.3}]
    assert metric_series(rows, ("kl",)) == ("kl", [1, 5], [0.1, 0.3])
    assert metric_series(rows, ("missing", "kl"))[0] == "kl"
    assert metric_series(rows, ("missing",)) == (None, [], [])


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], weight=0.9) == pytest.approx([2.0, 2.0, 2.0])
    # w = 0.5: s1 = 0.5 -> 1.0 ; s2 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75
    assert ema([1.0, 3.0], weight=0.5) == pytest.approx([1.0, 1.75 / 0.75])
    assert ema([5.0]) == [5.0]
    assert all(math.isfinite(v) for v in ema(list(range(1000))))
    with pytest.raises(ValueError):
        ema([1.0], weight=1.0)


def test_cli_plot(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    _write_metrics(tmp_path / "metrics.jsonl", steps=5)
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_kl_panel_says_no_kl_term_when_beta_is_zero(tmp_path):
    from echoink.analysis.curves import run_beta, training_figure

    path = _write_metrics(tmp_path / "metrics.jsonl", steps=4, with_eval=False)
    rows = load_metrics(path)
    kl_axis = training_figure(rows, "run", beta=0.0).axes[3]
    assert [t.get_text() for t in kl_axis.texts] == ["β = 0: no KL term"] and not kl_axis.lines
    assert training_figure(rows, "run", beta=0.04).axes[3].lines                 # a KL term: its curve is drawn
    assert run_beta(path) is None
    (tmp_path / "config.resolved.json").write_text('{"beta": 0.0}')
    assert run_beta(path) == 0.0
    assert plot_training_curves(tmp_path, tmp_path / "c.png").is_file()


def test_shares_on_a_fixed_unit_axis_and_the_eval_interval_drawn(tmp_path):
    """A drop from 1.00 to 0.94 stays small on the page; the eval panel draws its interval; loss, grad norm,
    learning rate and clip ratio get their own panels (issue 22, item 10)."""
    from echoink.analysis.curves import PANELS, training_figure

    rows = [{"step": s, "rewards/accuracy": 1.0 if s < 3 else 0.94, "rewards/format": 1.0, "loss": 0.1 * s,
             "grad_norm": 2.0 + s, "learning_rate": 1e-6 * s, "clip_ratio/region_mean": 0.01 * s,
             "informative_share": 0.5} for s in range(1, 6)]
    rows.append({"step": 5, "eval/accuracy": 0.6, "eval/ci_low": 0.4, "eval/ci_high": 0.75, "eval/n": 20})
    rows.append({"step": 3, "eval/accuracy": 0.5, "eval/ci_low": None, "eval/ci_high": None})
    figure = training_figure(rows)
    by_title = {panel.title: axis for panel, axis in zip(PANELS, figure.axes)}
    assert {"Loss", "Gradient norm", "Learning rate", "Clipped ratios"} <= set(by_title)
    for panel in PANELS:
        low, high = by_title[panel.title].get_ylim()
        if panel.unit and by_title[panel.title].lines:
            assert low <= 0.0 and high >= 1.0 and high - low < 1.1, panel.title
    assert list(by_title["Loss"].lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    eval_axis = by_title["Evaluation accuracy"]
    bars = [c for c in eval_axis.collections if len(c.get_segments()) == 1]
    assert len(bars) == 1  # the step with an interval; the one without draws its point alone
    (x0, y0), (x1, y1) = bars[0].get_segments()[0]
    assert (x0, x1) == (5, 5) and sorted((y0, y1)) == pytest.approx([0.4, 0.75])
    assert list(eval_axis.lines[0].get_ydata()) == [0.5, 0.6]


def test_values_near_the_float_limit_are_named_not_drawn(tmp_path):
    from echoink.analysis.curves import training_figure

    rows = [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 1.5e308}, {"step": 3, "kl": 0.2}]
    kl_axis = training_figure(rows, beta=0.04).axes[3]
    assert list(kl_axis.lines[0].get_ydata()) == [0.1, 0.2]
    assert any("1 value(s) beyond" in text.get_text() for text in kl_axis.texts)
