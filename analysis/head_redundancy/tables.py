"""Head-redundancy results as tables: one row per head, and both similarity matrices in long form."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.head_redundancy.records import RedundancyResult


def to_dataframe(results: RedundancyResult | Sequence[RedundancyResult]) -> pd.DataFrame:
    """One row per (model, block, head): redundancy by attention maps and by outputs, cluster rank, embedding."""
    rows = []
    for result in _as_list(results):
        offset = 0
        for b in result.blocks:
            rank = np.argsort(b.head_order)
            for h in range(b.num_heads):
                rows.append(dict(
                    model=result.model, attention_type=result.kind, random_weights=result.random_weights,
                    images=result.num_images, stage=b.stage, block=b.block, relative_depth=b.relative_depth,
                    head=h, attention_redundancy=b.attention_redundancy[h], feature_redundancy=b.feature_redundancy[h],
                    most_similar_head=_most_similar(b.attention_similarity, h), cluster_rank=int(rank[h]),
                    embedding_x=result.embedding[offset + h, 0], embedding_y=result.embedding[offset + h, 1],
                ))
            offset += b.num_heads
    return pd.DataFrame(rows)


def similarity_dataframe(results: RedundancyResult | Sequence[RedundancyResult]) -> pd.DataFrame:
    """One row per (model, block, head i, head j) with both similarity matrices in long form."""
    rows = [
        dict(model=r.model, attention_type=r.kind, random_weights=r.random_weights, stage=b.stage, block=b.block,
             head_i=i, head_j=j, attention_similarity=b.attention_similarity[i, j],
             feature_similarity=b.feature_similarity[i, j])
        for r in _as_list(results) for b in r.blocks for i in range(b.num_heads) for j in range(b.num_heads)
    ]
    return pd.DataFrame(rows)


def _most_similar(similarity: np.ndarray, head: int) -> int:
    others = np.where(np.arange(len(similarity)) == head, -np.inf, similarity[head])
    return int(np.argmax(others)) if len(similarity) > 1 else -1


def _as_list(results) -> list[RedundancyResult]:
    return [results] if isinstance(results, RedundancyResult) else list(results)
