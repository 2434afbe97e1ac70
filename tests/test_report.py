"""The HTML reports: every section present, every image decodes, the scores are those of
metrics.csv / results.csv, nothing fetched from the network."""

import base64
import io
import json
from html.parser import HTMLParser

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import spamask_integrate as si
from cli.main import main
from conftest import (write_h5ad_slices, write_plan_with_a_broken_dataset,
                      write_slices_and_config)
from spamask_integrate.benchmark import _read_results, summarise
from spamask_integrate.report import BENCHMARK_SECTIONS, RUN_SECTIONS

FAST_CONFIG = """
train: {epochs: 8, hidden_dim: 32, latent_dim: 16, edge_decoder_hidden: 32}
preprocess: {n_top_genes: null, n_comps: 20, min_cells: 5}
scib_max_spots: 400
"""


class Page(HTMLParser):
    """Collects section ids, image sources, external references and data-value cells."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external, self.cells, self.metric_cells = \
            [], [], [], {}, []
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append(a["src"])
        for name in ("src", "href"):
            value = a.get(name) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag in ("link", "script") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))
        if "data-key" in a:
            self.cells[a["data-key"]] = float(a["data-value"])
        if "data-metric" in a:
            self.metric_cells.append((a["data-metric"], float(a["data-value"])))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _assert_images_decode(page):
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.size[0] > 100 and img.size[1] > 100


@pytest.fixture
def run_folder(tiny_slices, tmp_path):
    paths, config = write_slices_and_config(tiny_slices, tmp_path, FAST_CONFIG)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "run", *map(str, paths), "-o", str(out),
                                    "--label-key", "ground_truth", "--n-domains", "4", "--k",
                                    "6", "--config", str(config), "--seed", "3"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, paths, config


def test_run_report_sections_images_and_scores(run_folder):
    out, _, _ = run_folder
    report = out / "report.html"
    assert 10_000 < report.stat().st_size < 5_000_000
    page = _parse(report)
    assert page.sections == list(RUN_SECTIONS)
    assert not page.external
    _assert_images_decode(page)
    assert len(page.images) == 4  # scores, domain maps beside the truth, UMAP, loss curves
    metrics = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""],
                          float_precision="round_trip")
    scored = metrics[metrics["kind"] != "info"]
    keys = {"|".join(str(v) for v in r) for r in
            scored[["kind", "scope", "embedding", "metric"]].fillna("").itertuples(index=False)}
    assert set(page.cells) == keys
    for r in scored.fillna({"embedding": ""}).itertuples():
        assert page.cells[f"{r.kind}|{r.scope}|{r.embedding}|{r.metric}"] == r.value
    text = " ".join(page.text)
    run = json.loads((out / "run.json").read_text())
    for name in ("slice0", "slice1", "ground_truth", "Seconds per step", "Versions"):
        assert name in text
    assert str(run["params"]["train"]["seed"]) in text and "dgl" in text
    assert "seeded sample of 400 of 600 spots" in text  # the scib sample is a warning


def test_report_rebuilds_after_evaluate_and_can_be_turned_off(run_folder, tmp_path):
    out, paths, config = run_folder
    before = (out / "report.html").read_text()
    res = CliRunner().invoke(main, ["-q", "evaluate", str(out / "integrated.h5ad"),
                                    "--label-key", "ground_truth", "--no-scib", "-o",
                                    str(out / "metrics.csv")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    page = _parse(out / "report.html")
    assert page.sections == list(RUN_SECTIONS)
    assert not any(k.startswith("integration|") for k in page.cells)  # scib was left out
    assert "scib-metrics was off" in " ".join(page.text)
    assert (out / "report.html").read_text() != before
    res = CliRunner().invoke(main, ["report", str(tmp_path / "data")])
    assert res.exit_code == 1 and "neither a run" in res.output
    off = tmp_path / "off"
    res = CliRunner().invoke(main, ["-q", "run", *map(str, paths), "-o", str(off), "--k", "6",
                                    "--config", str(config), "--no-scib", "--no-report"])
    assert res.exit_code == 0, res.output
    assert (off / "integrated.h5ad").is_file() and not (off / "report.html").exists()


def test_benchmark_report_table_boxes_and_failures(tiny_slices, tmp_path):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    plan = write_plan_with_a_broken_dataset(paths, tmp_path)
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, ["-q", "benchmark", str(plan), "-o", str(out)])
    assert res.exit_code == 0, res.output
    page = _parse(out / "report.html")
    assert page.sections == list(BENCHMARK_SECTIONS)
    assert not page.external
    _assert_images_decode(page)
    summary = summarise(_read_results(out / "results.csv"))
    expected = sorted(summary[("ARI", "mean")].tolist() + summary[("NMI", "mean")].tolist())
    assert sorted(v for _, v in page.metric_cells) == expected
    text = " ".join(page.text)
    assert "missing.h5ad: file not found" in text and text.count("broken / pca") == 2
    (out / "report.html").unlink()
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0 and (out / "report.html").is_file()


def test_many_slices_draw_a_bounded_number_of_panels():
    """An atlas of hundreds of slices draws at most MAX_SLICE_PANELS slices, evenly spaced."""
    from spamask_integrate.plot import MAX_SLICE_PANELS, domain_maps, shown_slices

    names = [f"s{i}" for i in range(300)]
    shown = shown_slices(names)
    assert len(shown) == MAX_SLICE_PANELS and shown[0] == "s0" and shown[-1] == "s299"
    assert shown_slices(names[:5]) == names[:5] and len(shown_slices(names, None)) == 300
    a = si.datasets.synthetic_slices(30, 40, 20, 3, seed=0)
    a.obs["domain"] = a.obs["ground_truth"]
    fig = domain_maps(a, "domain", "slice", "ground_truth", max_slices=6)
    drawn = [ax for ax in fig.axes if ax.get_title()]
    assert len(drawn) == 12  # 6 slices x (domains, truth)


def test_umap_figure_uses_an_exact_neighbour_search(monkeypatch):
    """Above 4,096 points umap-learn would build a pynndescent index (a numba compile of
    about 30 s per process); the report's UMAP gives it exact neighbours instead."""
    import numpy as np
    import umap.umap_ as umap_module

    from spamask_integrate import plot

    class NoIndex:
        def __init__(self, *args, **kwargs):
            raise AssertionError("pynndescent was called")

    monkeypatch.setattr(umap_module, "NNDescent", NoIndex)
    rng = np.random.default_rng(0)
    n = 4_200
    x = rng.normal(size=(n, 8)) + np.repeat(np.eye(8)[:3] * 6, n // 3, axis=0)
    ind, dist = plot._exact_knn(x.astype(np.float32), 15)
    assert ind.shape == (n, 15) and (ind[:, 0] == np.arange(n)).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    a = si.datasets.synthetic_slices(2, n // 2, 20, 3, seed=0)
    a.obsm["X_emb"] = x
    a.obs["domain"] = pd.Categorical(np.repeat(["a", "b", "c"], n // 3))
    fig = plot.umap(a, "X_emb", ("domain", "slice"))
    assert len(fig.axes) == 2


def test_start_agreement_warns_only_when_the_starts_are_the_domains():
    # the starts of a merged fit have more components than domains: their lower agreement
    # says nothing about the K domains
    import anndata as ad
    import numpy as np

    from spamask_integrate.report import _warnings

    a = ad.AnnData(np.zeros((3, 1), np.float32))
    metrics = pd.DataFrame(columns=["kind", "scope", "metric", "value"])
    a.uns["spamask"] = {"cluster": {"start_agreement": 0.7, "merge_rep": ""}}
    assert any("agree only at mean ARI 0.70" in w for w in _warnings(a, metrics, {}))
    a.uns["spamask"]["cluster"]["merge_rep"] = "X_pca"
    assert not any("agree only" in w for w in _warnings(a, metrics, {}))
