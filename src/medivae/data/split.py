"""Seeded, stratified and patient-grouped splits.

Hand-written because scikit-learn's splitters take 32-bit seeds only and have no
fraction-based stratified *and* grouped splitter; this one keeps every group (patient) in one split.
"""

from __future__ import annotations

import numpy as np

from medivae.runtime.seeding import numpy_rng


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices for train/val/test; stratified by label, groups never straddle splits."""
    labels = np.asarray(labels)
    n = len(labels)
    if groups is None:
        groups = np.arange(n)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inverse = inverse.reshape(-1)
    # a group's stratum is its most frequent label (ties: the smallest), counted in one pass
    label_values, label_codes = np.unique(labels, return_inverse=True)
    n_labels = max(len(label_values), 1)
    flat = inverse * n_labels + label_codes.reshape(-1)
    counts = np.bincount(flat, minlength=len(uniq) * n_labels).reshape(len(uniq), n_labels)
    group_label = label_values[counts.argmax(1)] if n else np.zeros(0, dtype=np.int64)
    rng = numpy_rng(seed, "split")
    assign = np.zeros(len(uniq), dtype=np.int8)  # 0 train, 1 val, 2 test
    for lab in np.unique(group_label):
        members = np.flatnonzero(group_label == lab)
        members = members[rng.permutation(len(members))]
        k = len(members)
        n_test = int(round(k * test_fraction))
        n_val = int(round(k * val_fraction))
        if k >= 3:  # keep at least one group for training
            n_test = min(n_test, k - 1)
            n_val = min(n_val, k - 1 - n_test)
        assign[members[:n_test]] = 2
        assign[members[n_test : n_test + n_val]] = 1
    per_item = assign[inverse]
    return {name: np.flatnonzero(per_item == code) for code, name in enumerate(("train", "val", "test"))}
