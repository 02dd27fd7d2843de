"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from demo.data import generate_demo_data


@pytest.fixture(scope="session")
def small_demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small demo dataset (16 training images of 64 px, 6 test images, the random d-VAE):
    the absolute paths returned by :func:`demo.data.generate_demo_data`."""
    return generate_demo_data(tmp_path_factory.mktemp("demo_data"), num_train_images=16, num_test_images=6,
                              image_size=64)
