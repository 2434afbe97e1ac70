import hashlib

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spamask_integrate as si
from conftest import DLPFC, assert_symmetric, requires_dlpfc, write_h5ad_slices


def _write_10x_h5(path, counts: sp.csr_matrix, barcodes, genes):
    counts = sp.csr_matrix(counts, dtype=np.int32)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.asarray(barcodes, dtype="S")
        m["data"], m["indices"], m["indptr"] = counts.data, counts.indices, counts.indptr
        m["shape"] = np.array([counts.shape[1], counts.shape[0]])
        feats = m.create_group("features")
        feats["id"] = np.asarray(genes, dtype="S")
        feats["name"] = np.asarray(genes, dtype="S")
        feats["feature_type"] = np.asarray(["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.asarray(["GRCh38"] * len(genes), dtype="S")


def _slice_parts(tiny_slices, name="slice0"):
    part = tiny_slices[tiny_slices.obs["slice"] == name]
    barcodes = [n.split("_", 1)[1] for n in part.obs_names]
    return part, barcodes


def test_read_h5ad_list(tiny_slices, tmp_path):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    a = si.read_slices(paths, label_key="ground_truth")
    assert a.n_obs == 600
    assert list(a.obs["slice"].cat.categories) == ["slice0", "slice1"]
    assert a.obs_names[0] == "slice0_spot0" and a.obs_names.is_unique
    assert a.obsm["spatial"].shape == (600, 2) and a.obsm["spatial"].dtype == np.float64
    assert sp.issparse(a.layers["counts"]) and (a.layers["counts"] != tiny_slices.X).nnz == 0
    assert a.obs["ground_truth"].nunique() == 4
    assert a.uns["spamask"]["read"]["n_genes_kept"] == 120


def test_read_without_counts_layer_keeps_one_copy(tiny_slices, tmp_path):
    """counts_layer=False (the run's own read): the counts in X only, and preprocess makes
    the same result from them as from a read with the layer."""
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    one = si.read_slices(paths, counts_layer=False)
    two = si.read_slices(paths)
    assert "counts" not in one.layers and (one.X != two.layers["counts"]).nnz == 0
    for a in (one, two):
        si.preprocess(a, n_top_genes=40, n_comps=10, min_cells=5)
    np.testing.assert_array_equal(one.obsm["X_pca"], two.obsm["X_pca"])
    assert (one.layers["counts"] != two.layers["counts"]).nnz == 0

def test_manifests_yaml_and_csv(tiny_slices, tmp_path):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    yml = tmp_path / "slices.yaml"
    yml.write_text("slices:\n" + "".join(
        f"  - path: {p.name}\n    slice: S{i}\n    platform: visium\n" for i, p in enumerate(paths)))
    a = si.read_slices(yml)
    assert list(a.obs["slice"].cat.categories) == ["S0", "S1"]
    assert a.uns["spamask"]["read"]["platforms"]["S0"] == "visium"
    csv = tmp_path / "slices.csv"
    pd.DataFrame({"path": [p.name for p in paths], "slice": ["B", "A"],
                  "label_key": ["ground_truth"] * 2}).to_csv(csv, index=False)
    b = si.read_slices(csv, batch_key="section")
    assert list(b.obs["section"].cat.categories) == ["B", "A"]  # input order kept
    assert "label" in b.obs.columns


def test_visium_folder_keeps_in_tissue(tiny_slices, tmp_path):
    part, barcodes = _slice_parts(tiny_slices)
    folder = tmp_path / "visium_A"
    (folder / "spatial").mkdir(parents=True)
    _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", part.X, barcodes, list(part.var_names))
    xy = part.obsm["spatial"]
    in_tissue = np.ones(len(barcodes), dtype=int)
    in_tissue[:10] = 0
    pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": 0, "array_col": 0,
                  "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]}).to_csv(
        folder / "spatial" / "tissue_positions.csv", index=False)
    a = si.read_slices([folder])
    assert a.n_obs == 290
    assert np.allclose(a.obsm["spatial"], xy[10:])
    assert list(a.obs["slice"].cat.categories) == ["visium_A"]


def test_10x_h5_and_counts_csv_with_coordinates(tiny_slices, tmp_path):
    part, barcodes = _slice_parts(tiny_slices, "slice1")
    _write_10x_h5(tmp_path / "s1.h5", part.X, barcodes, list(part.var_names))
    coords = pd.DataFrame(part.obsm["spatial"], index=barcodes, columns=["x", "y"])
    coords.to_csv(tmp_path / "s1_coords.csv")
    counts = pd.DataFrame(part.X.toarray(), index=barcodes, columns=part.var_names)
    counts.to_csv(tmp_path / "s2.tsv", sep="\t")
    coords.to_csv(tmp_path / "s2_coordinates.csv")  # found by name
    a = si.read_slices([(tmp_path / "s1.h5", tmp_path / "s1_coords.csv"), tmp_path / "s2.tsv"])
    assert a.n_obs == 600
    assert list(a.obs["slice"].cat.categories) == ["s1", "s2"]
    assert np.allclose(a.obsm["spatial"][:300], part.obsm["spatial"])
    assert (a.X[:300] != a.X[300:]).nnz == 0


def test_inner_and_outer_join(tiny_slices, tmp_path):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    b = ad.read_h5ad(paths[1])
    b = b[:, 20:].copy()
    b.write_h5ad(paths[1])
    inner = si.read_slices(paths)
    assert inner.n_vars == 100 and inner.uns["spamask"]["read"]["n_genes_dropped"] == 20
    outer = si.read_slices(paths, join="outer")
    assert outer.n_vars == 120
    # gene annotations every slice agrees on reach the joined AnnData (and integrated.h5ad)
    assert inner.var["marker_of"].astype(str).equals(
        tiny_slices.var["marker_of"].iloc[20:].astype(str))
    missing = [f"gene{i}" for i in range(20)]
    assert outer[outer.obs["slice"] == "slice1", missing].X.nnz == 0
    assert outer[outer.obs["slice"] == "slice0", missing].X.nnz > 0


# ----------------------------------------------------------------- bad input, one test each
def _one_bad(tiny_slices, tmp_path, edit):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    b = ad.read_h5ad(paths[1])
    b = edit(b)
    b.write_h5ad(paths[1])
    return paths


def _digest(paths):
    return [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]


def test_missing_file(tiny_slices, tmp_path):
    with pytest.raises(si.InputError, match="nope.h5ad"):
        si.read_slices([tmp_path / "nope.h5ad"])


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(si.InputError, match="broken.h5ad: cannot read"):
        si.read_slices([bad])


def test_no_coordinates(tiny_slices, tmp_path):
    def edit(b):
        del b.obsm["spatial"]
        return b
    paths = _one_bad(tiny_slices, tmp_path, edit)
    before = _digest(paths)
    with pytest.raises(si.InputError, match=r"slice1.*obsm\['spatial'\] is missing"):
        si.read_slices(paths)
    assert _digest(paths) == before  # nothing written or modified


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_coordinates(tiny_slices, tmp_path, value):
    def edit(b):
        b.obsm["spatial"][3, 0] = value
        return b
    with pytest.raises(si.InputError, match="slice1.*NaN or infinite coordinates"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit))


def test_wrong_coordinate_shape(tiny_slices, tmp_path):
    def edit(b):
        b.obsm["spatial"] = np.c_[b.obsm["spatial"], np.zeros(b.n_obs)]
        return b
    with pytest.raises(si.InputError, match=r"slice1.*shape \(300, 3\)"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit))


@pytest.mark.parametrize("value,msg", [(-1.0, "negative"), (np.nan, "NaN or infinite"),
                                       (np.inf, "NaN or infinite")])
def test_bad_counts(tiny_slices, tmp_path, value, msg):
    def edit(b):
        b.X = b.X.tocsr()
        b.X.data[0] = value
        return b
    with pytest.raises(si.InputError, match=f"slice1.*{msg}"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit))


def test_duplicated_barcodes(tiny_slices, tmp_path):
    def edit(b):
        names = list(b.obs_names)
        names[5] = names[4]
        b.obs_names = names
        return b
    with pytest.raises(si.InputError, match="slice1.*duplicated barcodes.*spot4"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit))


def test_duplicated_slice_names(tiny_slices, tmp_path):
    paths = write_h5ad_slices(tiny_slices, tmp_path)
    with pytest.raises(si.InputError, match="duplicated slice name.*slice0"):
        si.read_slices([{"path": paths[0]}, {"path": paths[1], "slice": "slice0"}])


def test_empty_slice(tiny_slices, tmp_path):
    with pytest.raises(si.InputError, match="slice1.*empty"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, lambda b: b[:0].copy()))


def test_too_few_spots(tiny_slices, tmp_path):
    with pytest.raises(si.InputError, match="slice1.*only 5 spots"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, lambda b: b[:5].copy()))


def test_no_shared_genes(tiny_slices, tmp_path):
    def edit(b):
        b.var_names = [f"other{i}" for i in range(b.n_vars)]
        return b
    with pytest.raises(si.InputError, match="share no gene names.*slice1"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit))


def test_missing_label_column(tiny_slices, tmp_path):
    def edit(b):
        del b.obs["ground_truth"]
        return b
    with pytest.raises(si.InputError, match=r"slice1.*obs\['ground_truth'\] not found"):
        si.read_slices(_one_bad(tiny_slices, tmp_path, edit), label_key="ground_truth")


def test_bad_manifest(tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text("slices: [unclosed")
    with pytest.raises(si.InputError, match="plan.yaml: cannot parse manifest"):
        si.read_slices(bad)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError), si.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with si.atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_stale_parts_of_a_killed_writer_are_swept(tmp_path):
    from spamask_integrate.io import remove_stale_parts

    target = tmp_path / "ckpt.pt"
    target.write_text("last complete")
    stale = tmp_path / ".ckpt.pt.x1y2z3.part.pt"  # as atomic_write names it; its writer died
    stale.write_text("half")
    other = tmp_path / ".other.pt.x1y2z3.part.pt"
    other.write_text("another file's")
    assert remove_stale_parts(target) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "ckpt.pt"]


# ----------------------------------------------------------------- real data
@requires_dlpfc
def test_dlpfc_four_slices_and_graph():
    a = si.read_slices(sorted(DLPFC.glob("*.h5ad")), label_key="layer")
    assert a.n_obs == 11_380
    assert a.obs["slice"].cat.categories.tolist() == ["151673", "151674", "151675", "151676"]
    g = si.build_graph(a, method="knn")
    assert g.num_nodes() == 11_380
    assert_symmetric(g)
    n = g.num_nodes()
    assert bool(g.has_edges_between(np.arange(n), np.arange(n)).all())
    src, dst = g.edges()
    s = g.ndata["slice"]
    assert int((s[src] != s[dst]).sum()) == 0


def _atlas(tiny_slices, path):
    """``tiny_slices`` as one h5ad, the slice in obs['sample'], barcodes unique over the file."""
    one = tiny_slices.copy()
    one.obs["sample"] = one.obs.pop("slice").astype(str)
    one.obs_names = [f"cell{i}" for i in range(one.n_obs)]
    one.layers = {}
    one.uns = {}
    one.write_h5ad(path)
    return path


def test_one_file_many_slices_by_column(tiny_slices, tmp_path):
    atlas = _atlas(tiny_slices, tmp_path / "atlas.h5ad")
    a = si.read_slices(atlas, label_key="ground_truth", slice_column="sample")
    assert list(a.obs["slice"].cat.categories) == ["slice0", "slice1"]
    assert a.obs["slice"].value_counts().to_dict() == {"slice0": 300, "slice1": 300}
    assert a.obs_names[0] == "slice0_cell0" and a.obs_names.is_unique
    assert (a.layers["counts"] != tiny_slices.X).nnz == 0  # same spots, same order
    assert a.uns["spamask"]["read"]["slice_column"] == "sample"
    # the same split from a manifest row, whose own slice_column wins over the argument
    yml = tmp_path / "atlas.yaml"
    yml.write_text("slices:\n  - path: atlas.h5ad\n    slice_column: sample\n")
    b = si.read_slices(yml, label_key="ground_truth")
    assert list(b.obs["slice"].cat.categories) == ["slice0", "slice1"]
    # a categorical column gives the category order
    one = ad.read_h5ad(atlas)
    one.obs["sample"] = pd.Categorical(one.obs["sample"], categories=["slice1", "slice0"])
    one.write_h5ad(tmp_path / "cat.h5ad")
    c = si.read_slices(tmp_path / "cat.h5ad", slice_column="sample")
    assert list(c.obs["slice"].cat.categories) == ["slice1", "slice0"]


def test_slice_column_errors_name_the_file_and_column(tiny_slices, tmp_path):
    atlas = _atlas(tiny_slices, tmp_path / "atlas.h5ad")
    with pytest.raises(si.InputError, match=r"atlas\.h5ad: slice column obs\['donor'\] not found"):
        si.read_slices(atlas, slice_column="donor")
    one = ad.read_h5ad(atlas)
    one.obs.loc[one.obs_names[:3], "sample"] = None
    one.write_h5ad(tmp_path / "holes.h5ad")
    with pytest.raises(si.InputError, match=r"holes\.h5ad: slice column obs\['sample'\] is "
                                            r"empty for 3 spots"):
        si.read_slices(tmp_path / "holes.h5ad", slice_column="sample")
    one = ad.read_h5ad(atlas)
    one.obs["sample"] = one.obs["sample"].astype(str)
    one.obs.loc[one.obs_names[:297], "sample"] = "tiny"
    one.obs.loc[one.obs_names[297:300], "sample"] = "tiny2"
    one.write_h5ad(tmp_path / "small.h5ad")
    with pytest.raises(si.InputError, match=r"small\.h5ad \(slice 'tiny2'\): only 3 spots"):
        si.read_slices(tmp_path / "small.h5ad", slice_column="sample")
