"""hbar.images.grid: tiling layout, PNG round trip, path checks, no pyplot."""

import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from hbar.images.grid import save_image_grid, tile_images, to_display
from hbar.images.preprocess import to_model_space
from hbar.validation import HbarInputError


def test_tile_layout():
    imgs = np.arange(5 * 2 * 3).reshape(5, 2, 3).astype(np.uint8) + 1
    t = tile_images(imgs, nrow=2, padding=1, pad_value=0)
    assert t.shape == (2 * 2 + 3, 3 * 3 + 4)  # 2 rows, ceil(5/2) = 3 columns
    np.testing.assert_array_equal(t[1:3, 1:4], imgs[0])
    np.testing.assert_array_equal(t[1:3, 5:8], imgs[1])
    np.testing.assert_array_equal(t[4:6, 1:4], imgs[3])
    np.testing.assert_array_equal(t[4:6, 5:8], imgs[4])
    assert np.all(t[4:6, 9:12] == 0) and np.all(t[0] == 0) and np.all(t[:, 4] == 0)
    t0 = tile_images(imgs[:4], padding=0)
    np.testing.assert_array_equal(t0, np.block([[imgs[0], imgs[1]], [imgs[2], imgs[3]]]))


def _png_grey(path):
    arr = matplotlib.image.imread(path)
    assert arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    return np.rint(arr[..., 0] * 255).astype(np.uint8)


def test_png_round_trip_of_integer_images_and_model_space_samples(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    tiled = save_image_grid(tmp_path / "a.png", imgs, levels=256, nrow=3)
    np.testing.assert_array_equal(tiled, tile_images(imgs, nrow=3))
    np.testing.assert_array_equal(_png_grey(tmp_path / "a.png"), tiled)
    # model-space samples at any offset inside the bin map back to the same pixels
    x = to_model_space(imgs, 256, u=rng.uniform(0, 1, (7, 20)))
    tiled_x = save_image_grid(tmp_path / "sub" / "b.png", x, shape=(5, 4), levels=256, nrow=3)
    np.testing.assert_array_equal(tiled_x, tiled)
    np.testing.assert_array_equal(_png_grey(tmp_path / "sub" / "b.png"), tiled)


def test_png_of_17_level_images_is_scaled_to_8_bits(tmp_path):
    imgs = np.arange(16 * 4, dtype=np.uint8).reshape(4, 4, 4) % 17
    tiled = save_image_grid(tmp_path / "d.png", imgs.reshape(4, 16), shape=(4, 4), levels=17, scale=3)
    grey = _png_grey(tmp_path / "d.png")
    assert grey.shape == (3 * tiled.shape[0], 3 * tiled.shape[1])
    np.testing.assert_array_equal(grey[::3, ::3], to_display(tiled, 17))
    assert to_display(np.array([0, 16]), 17).tolist() == [0, 255]


def test_bad_paths_and_images_are_refused_before_writing(tmp_path):
    imgs = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(HbarInputError, match=r"\.png"):
        save_image_grid(tmp_path / "a.jpg", imgs)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(HbarInputError, match="is a directory"):
        save_image_grid(tmp_path / "dir.png", imgs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HbarInputError, match="not a directory"):
        save_image_grid(tmp_path / "file" / "a.png", imgs)
    with pytest.raises(HbarInputError, match="0..16"):
        save_image_grid(tmp_path / "b.png", imgs + 20, levels=17)
    with pytest.raises(HbarInputError, match="square"):
        save_image_grid(tmp_path / "c.png", np.zeros((2, 10)))
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file"]


def test_writing_a_grid_does_not_load_pyplot(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from hbar.images.grid import save_image_grid\n"
        f"save_image_grid({str(tmp_path / 'g.png')!r}, np.zeros((4, 9)), levels=256)\n"
        "import matplotlib\n"
        "print('matplotlib.pyplot' in sys.modules, matplotlib.rcParams._get_backend_or_none())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "None"], out
    assert (tmp_path / "g.png").is_file()
