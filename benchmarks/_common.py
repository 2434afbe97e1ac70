"""Helpers shared by the benchmark scripts: data paths, machine description, result files."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = Path(os.environ.get("SPAMASK_SHARED", HERE.parent.parent / "shared")) / "data"
DLPFC = SHARED / "dlpfc_donor3_paste2"


def dlpfc_files() -> list[Path]:
    files = sorted(DLPFC.glob("*.h5ad"))
    if len(files) != 4:
        sys.exit(f"the four DLPFC slices are not in {DLPFC}; set SPAMASK_SHARED")
    return files


def seed_list(text: str) -> list[int]:
    """Seeds from the command line: "0-9" (a range, both ends included) or "0,3,7"."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def stored_embedding_path(store: Path, tag: str, seed: int) -> Path:
    """Where ``model_ensembles.py train`` stores the embedding of ``seed`` (key ``emb``)."""
    return Path(store) / f"{tag}_{seed}.npz"


def stored_embedding(store: Path, tag: str, seed: int):
    """The embedding ``model_ensembles.py train`` stored for ``tag`` and ``seed``."""
    import numpy as np

    return np.load(stored_embedding_path(store, tag, seed))["emb"]


class StoredRun:
    """The slices, labels and coordinates ``model_ensembles.py train`` stored for ``tag`` in
    ``store`` (meta_<tag>.npz), as an AnnData with the spatial graph the caller's prior uses
    (``k`` as in ``build_graph``), and the mean over slices of the per-slice ARI."""

    def __init__(self, store: Path, tag: str, k: int | None = None):
        import anndata as ad
        import numpy as np
        import pandas as pd

        import spamask_integrate as si

        meta = np.load(store / f"meta_{tag}.npz", allow_pickle=True)
        self.store, self.tag = store, tag
        self.label, self.slices = meta["label"].astype(str), meta["slice"].astype(str)
        self.known = ~pd.Series(self.label).isin(["nan", "None", ""]).to_numpy()
        self.base = ad.AnnData(np.zeros((len(self.slices), 1), dtype=np.float32))
        self.base.obs["slice"] = pd.Categorical(self.slices)
        self.base.obsm["spatial"] = meta["xy"]
        si.build_graph(self.base, "slice", k=k)

    def embedding(self, seed: int):
        return stored_embedding(self.store, self.tag, seed)

    def score(self, domains) -> float:
        import numpy as np
        from sklearn.metrics import adjusted_rand_score

        return float(np.mean([adjusted_rand_score(self.label[m], np.asarray(domains)[m])
                              for s in self.base.obs["slice"].cat.categories
                              for m in [(self.slices == s) & self.known]]))


def stored_embedding_parser(doc: str):
    """The command line of the scripts that re-run the caller on the embeddings
    ``model_ensembles.py train`` stored: a plan, the store's tag and folder, seeds, a result
    name. Add a script's own options to the parser it returns."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--name", default=None)
    return parser


class PlanData:
    """A plan's first dataset prepared as the benchmark harness prepares it (the same spot
    names, so the caller's samples are the harness's), with what the scripts that re-run the
    caller on stored embeddings need: the batch and label keys, K, whether the plan runs
    Harmony, the caller's canonical spot order (the order of the spot names, as
    ``cluster``) and each spot's slice in that order, and the harness's score."""

    def __init__(self, plan_path: str, variant: str = "default"):
        import numpy as np

        from spamask_integrate import benchmark as B

        plan = B.load_plan(plan_path)
        self.ds, self.adata = B._prepared(plan, plan["datasets"][0]["name"], variant, {})
        self.batch_key = self.ds.get("batch_key", "slice")
        self.label_key = self.ds["label_key"]
        self.k = int(self.ds.get("n_domains", 7))
        self.harmony = bool(plan["settings"].get("harmony", [True])[0]) \
            and self.adata.obs[self.batch_key].nunique() > 1
        self.order = np.argsort(self.adata.obs_names.to_numpy(dtype=str), kind="stable")
        self.names = self.adata.obs[self.batch_key].astype(str).to_numpy()[self.order]

    def caller_inputs(self, embedding, seed: int) -> dict[str, str]:
        """The ``obsm`` keys of what the caller clusters for SpaMask (its input as ``run``
        builds it from ``embedding``) and for smoothed PCA (:meth:`smoothed_pca_input`), each
        with Harmony when the plan has it, all seeded with ``seed``."""
        import numpy as np

        import spamask_integrate as si

        self.adata.obsm["X_spamask"] = np.ascontiguousarray(embedding, dtype=np.float32)
        _, rep = si.caller_input(self.adata, self.batch_key, harmony=self.harmony, seed=seed)
        return {"spamask": rep, "smoothed_pca": self.smoothed_pca_input(seed)}

    def smoothed_pca_input(self, seed: int) -> str:
        """The ``obsm`` key of smoothed PCA as the harness clusters it (Harmony seeded with
        ``seed`` when the plan has it); the smoothing is done once."""
        import spamask_integrate as si
        from spamask_integrate.baselines import smoothed_pca

        if "X_pca_smoothed" not in self.adata.obsm:
            smoothed_pca(self.adata, self.batch_key)
        if not self.harmony:
            return "X_pca_smoothed"
        si.integrate(self.adata, self.batch_key, use_rep="X_pca_smoothed",
                     key_added="X_pca_smoothed_harmony", seed=seed)
        return "X_pca_smoothed_harmony"

    def caller_view(self, key: str, seed: int):
        """What the caller fits its mixtures to for ``obsm[key]``: the spots in its canonical
        order, reduced to its default number of principal components (seeded with ``seed``,
        as ``cluster`` seeds it)."""
        import inspect

        import spamask_integrate as si
        from spamask_integrate.cluster import reduce

        n_pcs = inspect.signature(si.cluster).parameters["n_pcs"].default
        return reduce(self.adata.obsm[key][self.order], n_pcs, seed)

    def neighbours(self):
        """The caller's spatial graph (same-slice neighbours, CSR) in its canonical order."""
        from spamask_integrate.cluster import same_slice_neighbours

        return same_slice_neighbours(self.adata, self.batch_key)[self.order][:, self.order]

    def score(self, key: str = "domain") -> float:
        """The harness's score of ``obs[key]``: the mean over slices of the per-slice ARI."""
        import spamask_integrate as si

        t = si.evaluate(self.adata, self.label_key, self.batch_key, domain_key=key, scib=False)
        return float(t[(t["kind"] == "domain") & (t["metric"] == "ARI")
                       & (t["scope"] != "all")]["value"].mean())


def machine() -> dict:
    """What the numbers were measured on: the CPU, the threads and the package versions and
    CPU kernels a run records (``spamask_integrate.train.versions``)."""
    import torch

    from spamask_integrate.train import versions

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **versions(), "date": time.strftime("%Y-%m-%d")}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def timed_cli(args: list[str], env: dict | None = None):
    """Run ``args`` under ``/usr/bin/time -v`` (with ``env`` added to the environment); exit
    on failure. Returns (process, wall seconds, peak RSS in GB of the largest process of the
    tree)."""
    import re
    import subprocess

    tic = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - tic
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return proc, wall, rss_kb / 1024**2


def caller_seed_rules(calls: dict) -> dict:
    """Per rule, from ``calls[rule] = [(domains, score) for caller seed s, the same for
    s + 1000]``: both scores and the ARI between the two calls' domains (1.0: the same
    partition)."""
    from sklearn.metrics import adjusted_rand_score

    return {rule: {"ari": score_a, "ari_other_seed": score_b,
                   "same": float(adjusted_rand_score(a, b))}
            for rule, ((a, score_a), (b, score_b)) in calls.items()}


def caller_seed_summary(rows: list[dict], rules) -> dict:
    """For the ``rules`` of :func:`caller_seed_rules` over ``rows`` (one per embedding): the
    score's mean, sd and minimum for caller seed s, its mean for s + 1000, and on how many
    embeddings the two caller seeds gave the very same domains."""
    import numpy as np

    summary = {}
    for rule in rules:
        scores = np.array([r[rule]["ari"] for r in rows])
        same = np.array([r[rule]["same"] for r in rows])
        summary[rule] = {
            "ari_mean": float(scores.mean()), "ari_sd": float(scores.std(ddof=1)),
            "ari_min": float(scores.min()),
            "ari_other_seed_mean": float(np.mean([r[rule]["ari_other_seed"] for r in rows])),
            "identical_domains": int((same > 1 - 1e-9).sum()), "embeddings": len(rows),
            "same_mean": float(same.mean())}
    return summary


def print_caller_seed_row(seed: int, method: str, row: dict, rules, *extra: str) -> None:
    """One line per embedding and method: each rule's scores for both caller seeds."""
    print(seed, method, ", ".join(f"{rule} {row[rule]['ari']:.3f}/"
                                  f"{row[rule]['ari_other_seed']:.3f} "
                                  f"(same {row[rule]['same']:.3f})" for rule in rules),
          *extra, flush=True)
