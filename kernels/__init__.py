"""Level 1 of sslcore: Triton kernels, their autograd Functions and plain-torch ``*_ref``s.

Imported as ``sslcore.kernels`` (see pyproject's package-dir mapping).
"""
from ._backend import BACKENDS, interpreting, resolve_backend
from .contranorm import (
    NeighbourGraph,
    contranorm,
    contranorm_features_ref,
    contranorm_ref,
    prepare_graph,
    tied_attention_ref,
)
from .infonce import infonce, infonce_messages, infonce_ref, infonce_terms, lse_grad, lse_similarity, lse_similarity_ref
from .kmeans import kmeans_assign, kmeans_assign_ref, kmeans_trials, kmeans_update, kmeans_update_ref, nearest_cosine

__all__ = [
    "BACKENDS", "interpreting", "resolve_backend",
    "contranorm", "contranorm_ref", "contranorm_features_ref", "tied_attention_ref", "NeighbourGraph", "prepare_graph",
    "kmeans_assign", "kmeans_assign_ref", "kmeans_trials", "kmeans_update", "kmeans_update_ref", "nearest_cosine",
    "infonce", "infonce_ref", "infonce_messages", "infonce_terms", "lse_grad", "lse_similarity", "lse_similarity_ref",
]
