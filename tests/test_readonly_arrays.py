"""Read-only memmaps (the decoded cache) reach torch without PyTorch's "not writable" warning (issue 20)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from medivae.data.imageset import as_tensor
from medivae.evaluation.classifier import fit_classifier
from medivae.evaluation.features import fit_autoencoder


@pytest.fixture
def readonly_images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    np.save(path, rng.integers(0, 256, size=(40, 1, 32, 32), dtype=np.uint8))
    images = np.load(path, mmap_mode="r")
    assert not images.flags.writeable
    return images


def test_as_tensor_copies_readonly_and_wraps_writable(readonly_images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = as_tensor(readonly_images)
    assert torch.equal(t, torch.from_numpy(np.array(readonly_images)))
    writable = np.array(readonly_images)
    assert as_tensor(writable).data_ptr() == writable.ctypes.data  # no copy when torch can wrap it


def test_reference_extractors_train_on_readonly_memmap_without_warning(readonly_images):
    labels = np.repeat(np.arange(2), 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit_autoencoder(readonly_images, epochs=1)
        fit_classifier(readonly_images, labels, 2, epochs=1)
