"""The ViTDet-style feature pyramid over Vim blocks."""
import pytest
import timm
import torch

import visionmamba
from visionmamba.models.pyramid import VimFeaturePyramid
from visionmamba.models.registry import VARIANTS


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pyramid_strides_and_channels_for_every_variant(name):
    model = visionmamba.create_model(name, depth=4)  # four blocks are enough for the shapes
    pyramid = VimFeaturePyramid(model, out_indices=(0, 1, 2, 3)).eval()
    dim, stride = model.embed_dim, model.patch_embed.stride
    for size in ((64, 64), (96, 128)):
        with torch.no_grad():
            maps = pyramid(torch.randn(1, 3, *size))
        grid = model.patch_embed.grid_for(*size)  # H / 16, or H / 8 - 1 for the stride-8 models (patch 16)
        scale = lambda side, r: side * stride // r if r <= stride else side // (r // stride)  # noqa: E731
        assert [m.shape for m in maps] == [(1, dim, scale(grid[0], r), scale(grid[1], r)) for r in (4, 8, 16, 32)]
    assert [f["reduction"] for f in pyramid.feature_info] == [4, 8, 16, 32]


def test_class_token_never_reaches_a_map():
    """The maps hold exactly the patch tokens in raster order; the class token is not among them."""
    model = visionmamba.create_model("vim_tiny_patch16_224", depth=2).eval()
    x = torch.randn(1, 3, 64, 48)
    final, maps = model.forward_intermediates(x, indices=[1], norm=True)
    tokens = torch.cat([final[:, :6], final[:, 7:]], dim=1)  # 4 x 3 grid: class token at 12 // 2 = 6
    assert torch.allclose(maps[0].flatten(2).transpose(1, 2), tokens, atol=1e-6)
    assert maps[0].shape == (1, 192, 4, 3)


def test_pyramid_through_timm_features_only():
    net = timm.create_model("vim_tiny_patch16_224", features_only=True, feature_cls=VimFeaturePyramid, depth=24)
    assert net.out_indices == [5, 11, 17, 23] and len(net.model.layers) == 24
    maps = net(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


def test_pyramid_rejects_bad_configurations():
    model = visionmamba.create_model("vim_tiny_patch16_224", depth=4)
    with pytest.raises(ValueError, match="exactly four"):
        VimFeaturePyramid(model, out_indices=(1, 2))
    with pytest.raises(ValueError, match="strides 8 and 16"):
        VimFeaturePyramid(visionmamba.create_model("vim_tiny_patch16_224", depth=4, patch_size=4, stride=4, img_size=32))
