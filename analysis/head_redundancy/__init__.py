"""Head redundancy (EfficientViT, CVPR 2023): how similar the attention heads of a block are.

For each head, redundancy is the maximum cosine similarity between its attention map and any other head's
map in the same block (similarities averaged over images, and over windows for cascaded group attention).
The same is computed on the heads' outputs, with linear CKA as the similarity. Heads are ordered by hierarchical clustering
(scikit-learn) and embedded in 2-D with MDS (scikit-learn) on a descriptor comparable across blocks.

Modules: ``similarity`` (the metrics, on arrays), ``clustering`` (head order, MDS embedding), ``records`` (the
results, the accumulator, ``analyze_model(s)``), ``tables``, ``figures``, ``overlays`` (attention over the image).
"""
from analysis.head_redundancy.clustering import cluster_order, head_embedding
from analysis.head_redundancy.figures import (
    ALIKE_HEADS,
    EMBEDDING_NOISE,
    METRIC_WORDS,
    embedding_noise_axes,
    head_embedding_figure,
    redundancy_vs_depth,
    similarity_heatmaps,
    untrained_notes,
)
from analysis.head_redundancy.overlays import (
    attention_overlays,
    grid_query,
    mark_query,
    montage,
    overlay_heatmap,
    query_attention_grid,
    whole_image_query_label,
)
from analysis.head_redundancy.records import (
    ATTENTION,
    FEATURE,
    BlockRedundancy,
    HeadSimilaritySums,
    LoadedLike,
    Progress,
    RedundancyResult,
    analyze_model,
    analyze_models,
)
from analysis.head_redundancy.similarity import (
    centered_gram,
    head_feature_similarity,
    head_redundancy,
    head_similarity,
    offset_bins,
    offset_profile,
    pairwise_head_cosine,
)
from analysis.head_redundancy.tables import similarity_dataframe, to_dataframe

__all__ = [
    "ALIKE_HEADS", "ATTENTION", "BlockRedundancy", "EMBEDDING_NOISE", "FEATURE", "HeadSimilaritySums", "LoadedLike",
    "METRIC_WORDS", "Progress", "RedundancyResult", "analyze_model", "analyze_models", "attention_overlays",
    "centered_gram", "cluster_order", "embedding_noise_axes", "grid_query", "head_embedding",
    "head_embedding_figure", "head_feature_similarity", "head_redundancy", "head_similarity", "mark_query",
    "montage", "offset_bins", "offset_profile", "overlay_heatmap", "pairwise_head_cosine", "query_attention_grid",
    "redundancy_vs_depth", "similarity_dataframe", "similarity_heatmaps", "to_dataframe", "untrained_notes",
    "whole_image_query_label",
]
