"""The plotting helpers draw what they say (headless, Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tlcourse import viz  # noqa: E402


def test_plot_softened_keeps_the_class_order_and_reports_the_tail():
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0, -2.0])
    classes = ["a", "b", "c", "d", "e"]
    for T in (1.0, 4.0):
        ax = viz.plot_softened(logits, classes, T, k=3)
        bars = [p.get_width() for p in ax.patches][::-1]          # drawn bottom-up: reverse
        expected = torch.softmax(logits / T, 0)[:3]
        assert np.allclose(bars, expected.numpy(), atol=1e-6)
        assert [t.get_text() for t in ax.get_yticklabels()][::-1] == ["a", "b", "c"]
        assert f"{1 - expected.sum().item():.2f} left for the other 2" in ax.get_title()
        plt.close("all")


def test_temperature_slider_is_interactive_when_ipywidgets_is_there(monkeypatch):
    pytest.importorskip("ipywidgets")
    monkeypatch.delenv("TLCOURSE_HEADLESS", raising=False)
    widget = viz.temperature_slider(torch.randn(10), [str(i) for i in range(10)], k=4, temperature=2.0)
    assert widget.widget.children[0].value == pytest.approx(2.0)
    plt.close("all")


def test_temperature_slider_is_a_static_figure_headless_or_without_ipywidgets(monkeypatch):
    import sys

    logits, classes = torch.randn(10), [str(i) for i in range(10)]
    monkeypatch.setenv("TLCOURSE_HEADLESS", "1")
    assert viz.temperature_slider(logits, classes, k=4, temperature=3.0).get_title().startswith("T = 3")
    monkeypatch.delenv("TLCOURSE_HEADLESS")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)       # as if it were not installed
    assert viz.temperature_slider(logits, classes, k=4, temperature=2.0).get_title().startswith("T = 2")
    plt.close("all")


def test_plot_heatmap_prints_every_cell_and_checks_the_shape():
    values = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    ax = viz.plot_heatmap(values, [1, 2, 4], [0.5, 0.9], "T", "alpha")
    assert sorted(t.get_text() for t in ax.texts) == ["0.100", "0.200", "0.300", "0.400", "0.500", "0.600"]
    with pytest.raises(ValueError, match="rows"):
        viz.plot_heatmap(values.T, [1, 2, 4], [0.5, 0.9], "T", "alpha")
    plt.close("all")


def test_plot_softened_says_all_classes_when_k_covers_them():
    logits = torch.tensor([3.0, 1.0, -2.0])
    title = viz.plot_softened(logits, ["a", "b", "c"], 2.0, k=3).get_title()
    assert title == "T = 2: all 3 classes shown", title
    assert "-0.00" not in viz.plot_softened(logits, ["a", "b", "c"], 2.0, k=5).get_title()
