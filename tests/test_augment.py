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


# ----- mixing (function matching) ------------------------------------------------------------------------

def test_mixup_blends_each_image_with_its_partner_and_cutmix_pastes_a_box_at_each_resolution():
    from edgekd.train.augment import draw_mix, mix_generator, mix_pixels

    pixels = torch.rand(6, 3, 20, 20) * 255
    mixup = draw_mix(6, 20, AugmentConfig(mixup_probability=1.0), mix_generator(0, 1, 2))
    assert mixup.box is None and 0 < mixup.lam < 1 and sorted(mixup.partners.tolist()) == list(range(6))
    expected = mixup.lam * pixels + (1 - mixup.lam) * pixels[mixup.partners]
    torch.testing.assert_close(mix_pixels(pixels, mixup), expected)

    cutmix = draw_mix(6, 10, AugmentConfig(cutmix_probability=1.0, cutmix_alpha=2.0), mix_generator(0, 1, 3))
    top, bottom, left, right = (round(edge * 20) for edge in cutmix.box)  # snapped at 10 px, scaled to 20
    assert 0 < (bottom - top) * (right - left) < 400
    assert cutmix.lam == pytest.approx(1 - (bottom - top) * (right - left) / 400)
    mixed = mix_pixels(pixels, cutmix)
    inside = torch.zeros(20, 20, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    torch.testing.assert_close(mixed[..., inside], pixels[cutmix.partners][..., inside])
    torch.testing.assert_close(mixed[..., ~inside], pixels[..., ~inside])


def test_the_mix_depends_only_on_seed_epoch_and_batch_never_on_the_global_rng():
    from edgekd.train.augment import draw_mix, mix_generator

    config = AugmentConfig(mixup_probability=0.5, cutmix_probability=0.5)
    first = draw_mix(8, 16, config, mix_generator(3, 2, 5))
    torch.manual_seed(123)
    again = draw_mix(8, 16, config, mix_generator(3, 2, 5))
    assert torch.equal(first.partners, again.partners) and (first.lam, first.box) == (again.lam, again.box)
    others = [draw_mix(8, 16, config, mix_generator(3, 2, b)) for b in range(6)]
    assert len({(m.lam, m.box) for m in others}) == 6  # each batch its own
    assert {m.box is None for m in others} == {True, False}  # both kinds drawn at 0.5 each
    assert draw_mix(8, 16, AugmentConfig(mixup_probability=0.0), mix_generator(0, 1, 0)) is None
