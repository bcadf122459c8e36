"""timm's own model tests, run on every Vim variant and official alias.

``timm_test_models.py`` is timm 1.0.31's ``tests/test_models.py``, copied unmodified from its sdist (sha256
ffb62c6d...; Apache-2.0, (c) Ross Wightman and the timm contributors). Its module-level selection lists do not
know our names, so this file calls its test functions directly, with the model names timm's rules would give
a plain token model such as ViT or DeiT (``vim_*`` beside ``vit_*`` in ``NON_STD_FILTERS``, our registry
module beside ``vision_transformer`` in ``FEAT_INTER_FILTERS``):

* every name: forward, the non-standard default-cfg test (API contract, meta device, factory device/dtype,
  reset_classifier), features_only (hooks and getter), forward_intermediates, forward through torch.fx;
* the variants (names with a pretrained cfg): backward, TorchScript, backward and TorchScript through torch.fx,
  and the two pretrained tests with a local stand-in checkpoint in place of the hub download
  (``pretrained_cfg_overlay=dict(file=...)``, timm's own local-file path);
* timm's generic contracts that use fixed model lists (head_hidden_size, init_weights after to_empty, pruning
  leaves no unused parameter) and the slow prune contract, on Vim-Ti.

Not run: the standard (NCHW) default-cfg test, which expects a spatial feature map and pooling; timm leaves
it out for every plain token model (``NON_STD_FILTERS``), ViT and DeiT included.
"""
import pytest
import timm
import timm_test_models as timm_tests
import torch

from visionmamba.models.registry import OFFICIAL_ALIASES, VARIANTS

VARIANT_NAMES = sorted(VARIANTS)
TAGGED = [f"{name}.in1k" for name in VARIANT_NAMES]  # how timm lists models with pretrained weights
ALIASES = sorted(OFFICIAL_ALIASES)


@pytest.mark.parametrize("name", VARIANT_NAMES + ALIASES)
def test_forward(name):
    timm_tests.test_model_forward(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_backward(name):
    timm_tests.test_model_backward(name, 2)


@pytest.mark.parametrize("name", TAGGED + ALIASES)
def test_default_cfgs_non_std(name):
    timm_tests.test_model_default_cfgs_non_std(name, 1, "meta")


@pytest.mark.parametrize("name", VARIANT_NAMES + ALIASES)
def test_forward_features(name):
    timm_tests.test_model_forward_features(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES + ALIASES)
def test_forward_intermediates_features(name):
    timm_tests.test_model_forward_intermediates_features(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES + ALIASES)
def test_forward_intermediates(name):
    timm_tests.test_model_forward_intermediates(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_forward_torchscript(name):
    timm_tests.test_model_forward_torchscript(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES + ALIASES)
def test_forward_fx(name):
    timm_tests.test_model_forward_fx(name, 1)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_backward_fx(name):
    timm_tests.test_model_backward_fx(name, 2)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_forward_fx_torchscript(name):
    timm_tests.test_model_forward_fx_torchscript(name, 1)


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    """One checkpoint per variant in place of the released file: its real shapes, random values."""
    root = tmp_path_factory.mktemp("stand_in")
    files = {}
    for name in VARIANT_NAMES:
        files[name] = root / f"{name}.pth"
        torch.save({"model": timm.create_model(name).state_dict()}, files[name])
    return files


@pytest.mark.parametrize("name", TAGGED)
def test_load_pretrained(name, stand_in_weights):
    """timm's test_model_load_pretrained with the stand-in: one grey input channel, another head."""
    overlay = dict(file=str(stand_in_weights[name.split(".")[0]]))
    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=num_classes)
        assert model.patch_embed.proj.weight.shape[1] == 1 and model.num_classes == num_classes


@pytest.mark.parametrize("name", TAGGED)
def test_features_pretrained(name, stand_in_weights):
    overlay = dict(file=str(stand_in_weights[name.split(".")[0]]))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    assert len(model.feature_info.channels()) == 4  # the blocks ending each quarter of the depth


def test_head_hidden_size():
    timm_tests.test_head_hidden_size("vim_tiny_patch16_224", {})


def test_init_weights_after_to_empty():
    timm_tests.test_model_init_weights_after_to_empty("vim_tiny_patch16_224", dict(depth=2))


def test_prune_intermediate_layers_params_used():
    timm_tests.test_prune_intermediate_layers_params_used("vim_tiny_patch16_224")


def test_prune_intermediate_layers_contract():
    timm_tests.test_prune_intermediate_layers_contract("vim_tiny_patch16_224")


def test_the_copy_of_timms_test_file_is_verbatim():
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(Path(timm_tests.__file__).read_bytes()).hexdigest()
    assert digest == "ffb62c6df02601a96c2fda403723a7f96a806897ee061d1009c1f3135fb64eb7"
