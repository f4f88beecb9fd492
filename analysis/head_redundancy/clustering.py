"""Heads ordered by hierarchical clustering and embedded in 2-D with MDS (scikit-learn)."""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def cluster_order(similarity: np.ndarray) -> np.ndarray:
    """Heads ordered so that similar heads sit together: leaves of an average-linkage tree on 1 - similarity."""
    from sklearn.cluster import AgglomerativeClustering

    n = similarity.shape[0]
    if n < 3:
        return np.arange(n)
    distance = np.clip(1.0 - np.asarray(similarity, dtype=np.float64), 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = AgglomerativeClustering(n_clusters=1, metric="precomputed", linkage="average",
                                   compute_full_tree=True).fit(distance)
    return _leaf_order(tree.children_, n)


def _leaf_order(children: np.ndarray, n_leaves: int) -> np.ndarray:
    """Left-to-right leaves of scikit-learn's merge tree (it exposes the tree but no leaf order)."""
    order, stack = [], [n_leaves + len(children) - 1]
    while stack:
        node = stack.pop()
        if node < n_leaves:
            order.append(node)
        else:
            left, right = children[node - n_leaves]
            stack.extend([right, left])
    return np.asarray(order)


def head_embedding(profiles: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """[sum H, 2]: MDS of all heads of a model, with 1 - cosine similarity of their offset profiles as dissimilarity."""
    from sklearn.manifold import MDS

    stacked = torch.as_tensor(np.concatenate(profiles), dtype=torch.float32)
    if stacked.shape[0] < 3:
        return np.zeros((stacked.shape[0], 2))
    unit = F.normalize(stacked, dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min(0).double().numpy()
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    return MDS(n_components=2, random_state=seed, **_mds_precomputed_kwargs()).fit_transform(distance)


def _mds_precomputed_kwargs() -> dict:
    """scikit-learn renamed MDS's 'dissimilarity' to 'metric' in 1.8; requirements allow >= 1.5."""
    params = inspect.signature(__import__("sklearn.manifold", fromlist=["MDS"]).MDS).parameters
    if "metric_mds" in params:
        return dict(metric="precomputed", metric_mds=True, init="classical_mds")
    return dict(dissimilarity="precomputed", n_init=4)
