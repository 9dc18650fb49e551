"""Sample-grid PNG layout (the grid itself is exercised end to end by tests/test_launch_ray.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2dist.launch.sample_grid import save_png, to_uint8_grid


def test_grid_places_each_image_row_major_with_padding(tmp_path):
    images = torch.stack([torch.full((3, 2, 3), v) for v in (-1.0, 0.0, 1.0)])  # 3 images, 2x3 pixels
    grid = to_uint8_grid(images, nrow=2)
    assert grid.shape == (4, 6, 3) and grid.dtype == np.uint8
    assert (grid[:2, :3] == 0).all() and (grid[:2, 3:] == 128).all() and (grid[2:, :3] == 255).all()
    assert (grid[2:, 3:] == 0).all()  # the missing 4th tile stays black
    from PIL import Image

    path = save_png(grid, tmp_path / "g" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path)), grid)


def test_grid_refuses_non_rgb():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8_grid(torch.zeros(2, 1, 4, 4), nrow=2)
