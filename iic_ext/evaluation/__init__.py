"""Evaluation of learned video representations: features, nearest-neighbour retrieval, kNN, plots.

Used by ``python -m iic_ext.retrieve``, ``python -m iic_ext.finetune`` and ``python -m iic_ext.linear``.
"""
from .features import FeatureCache, clip_input, extract_features, needed_modalities
from .retrieval import (DEFAULT_KS, accuracies, cosine_similarity_chunks, knn_classify, nearest_neighbours,
                        neighbour_mask, topk_retrieval)

__all__ = ["FeatureCache", "clip_input", "extract_features", "needed_modalities", "DEFAULT_KS", "accuracies",
           "cosine_similarity_chunks", "knn_classify", "nearest_neighbours", "neighbour_mask",
           "topk_retrieval"]
