import pytest
import torch

from edgekd.recipe import AugmentConfig
from edgekd.train.augment import augment_batch, batch_generator


def _batch(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_no_augmentation_returns_the_pixels_unchanged():
    x = _batch()
    assert not AugmentConfig().active
    torch.testing.assert_close(augment_batch(x, AugmentConfig(), batch_generator(0, 1, 0)), x.float())


def test_flip_mirrors_exactly_the_images_it_picks():
    x = _batch(n=32)
    out = augment_batch(x, AugmentConfig(flip=True), batch_generator(0, 1, 0))
    flipped = [torch.allclose(o, x[i].float().flip(-1), atol=1e-3) for i, o in enumerate(out)]
    kept = [torch.allclose(o, x[i].float(), atol=1e-3) for i, o in enumerate(out)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 4 < sum(flipped) < 28  # about half


def test_pad_and_crop_shifts_by_whole_pixels_with_reflected_edges():
    x = _batch(n=16, size=16)
    out = augment_batch(x, AugmentConfig(crop="pad", pad_fraction=0.125), batch_generator(3, 2, 1))
    for image, result in zip(x.float(), out):
        # The centre of a shifted image is the original's centre moved by at most 2 pixels, exactly.
        centre = result[:, 4:12, 4:12]
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.allclose(centre, image[:, 4 + dy:12 + dy, 4 + dx:12 + dx], atol=1e-3)]
        assert matches, "not a whole-pixel shift of the original"


def test_resized_crop_zooms_in_and_colour_jitter_stays_in_range():
    x = _batch(n=8, size=32)
    config = AugmentConfig(crop="resized", crop_scale=0.3, color_jitter=0.4)
    out = augment_batch(x, config, batch_generator(0, 1, 0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, x.float())


@pytest.mark.parametrize("config", [AugmentConfig(crop="resized", flip=True, color_jitter=0.2),
                                    AugmentConfig(crop="pad", flip=True)])
def test_augmentation_depends_only_on_seed_epoch_and_batch(config):
    x = _batch()
    first = augment_batch(x, config, batch_generator(1, 2, 3))
    torch.testing.assert_close(augment_batch(x, config, batch_generator(1, 2, 3)), first, rtol=0, atol=0)
    assert not torch.equal(augment_batch(x, config, batch_generator(1, 3, 3)), first)
    assert not torch.equal(augment_batch(x, config, batch_generator(1, 2, 4)), first)
