"""Metadata pictures: valid PNGs at the asked paths, shown inline as data URIs of their bytes."""

import base64

import numpy as np

from attribution_assets.engine.explain import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_pictures_are_pngs_and_markdown_embeds_their_bytes(tmp_path):
    rng = np.random.default_rng(0)
    hist = plots.score_histogram(rng.normal(size=(4, 50)), tmp_path / "h.png", "shard-00000")
    eig = {"a": rng.exponential(size=16), "b": np.r_[rng.exponential(size=8), np.zeros(8)]}
    spec = plots.spectrum_plot(eig, {"a": 0.1, "b": 0.05}, tmp_path / "s.png", train=eig["a"], query=eig["b"],
                               lam=0.9, top_k=3)
    recall = plots.recall_plot([[1, 0.5, 0.4], [2, 0.8, 0.7], [4, 0.97, 0.95]], tmp_path / "r.png",
                               parameter="nprobe", k=10, target=0.95, chosen=4)
    for path in (hist, spec, recall):
        data = path.read_bytes()
        assert data.startswith(PNG) and 2_000 < len(data) < plots.INLINE_LIMIT
        md = plots.png_markdown(path, "alt")
        uri = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
        assert base64.b64decode(uri) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "r.png", "s.png"]  # no temporaries left


def test_large_pictures_are_named_not_inlined(tmp_path, monkeypatch):
    path = plots.score_histogram(np.arange(10.0), tmp_path / "h.png", "x")
    monkeypatch.setattr(plots, "INLINE_LIMIT", 100)
    md = plots.png_markdown(path, "alt")
    assert "data:" not in md and str(path) in md


def test_score_histogram_has_a_log_count_axis_and_percentiles(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    captured = {}
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    values = np.r_[np.zeros(10_000), np.linspace(0.1, 0.5, 20)]
    path = plots.score_histogram(values, tmp_path / "h.png", "x")
    ax = captured["fig"].axes[0]
    assert ax.get_yscale() == "log"
    labels = [label for label in ax.get_legend_handles_labels()[1] if label.startswith("p")]
    assert labels == [f"p{q:g} = {np.percentile(values, q):+.4f}" for q in plots.PERCENTILES]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # outside the data
    assert int.from_bytes(path.read_bytes()[16:20], "big") == 800
