"""Vim variants registered with timm: short names, the official long names as aliases, pretrained cfgs.

The pretrained cfgs describe the evaluation transform the official accuracies were measured with
(resize 256 / centre crop 224, bicubic, ImageNet mean and std), not the official ``default_cfg``
(mean/std 0.5, crop 0.9), and where the released weights live on the Hugging Face hub. Besides the five
variants, ``vim_custom`` is a Vim built from its arguments alone (no released weights), for small or
experimental models such as the demos'.
"""
import os
import socket
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from visionmamba.models.vim import VisionMamba, checkpoint_filter_fn, load_checkpoint

# name -> constructor arguments (the official registrations, docs/specification.md §1).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "vim_tiny_patch16_224": dict(embed_dim=192, stride=16),
    "vim_tiny_patch16_stride8_224": dict(embed_dim=192, stride=8),
    "vim_small_patch16_224": dict(embed_dim=384, stride=16),
    "vim_small_patch16_stride8_224": dict(embed_dim=384, stride=8),
    "vim_base_patch16_224": dict(embed_dim=768, stride=16),
}

# The official registered names (hustvl/Vim:vim/models_mamba.py) -> ours.
OFFICIAL_ALIASES: Dict[str, str] = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (
        "vim_tiny_patch16_stride8_224"
    ),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": (
        "vim_small_patch16_stride8_224"
    ),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base_patch16_224",
}

# Released checkpoints (hustvl/Vim README, Hugging Face model pages): variant -> (hub repo, file, top-1).
RELEASED = {
    "vim_tiny_patch16_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", 76.1),
    "vim_tiny_patch16_stride8_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", 78.3),
    "vim_small_patch16_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 80.5),
    "vim_small_patch16_stride8_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", 81.6),
    # The Vim-B file name is not confirmed by the README; this is the name by analogy with the others.
    "vim_base_patch16_224": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth", 81.9),
}


CUSTOM = "vim_custom"


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Blocks ending each quarter of the depth, whose outputs feed dense-prediction heads: (5, 11, 17, 23)
    for the 24-block models, as in the official segmentation and detection configs."""
    return tuple(round(depth * (k + 1) / 4) - 1 for k in range(4))


def _cfg(hub_id: Optional[str] = None, filename: Optional[str] = None, top1: Optional[float] = None) -> Dict[str, Any]:
    weights = dict(
        hf_hub_id=hub_id,
        hf_hub_filename=filename,
        custom_load="hf",  # timm downloads the file, then VisionMamba.load_pretrained reads the .pth container
        notes=(f"official ImageNet-1k top-1 {top1}%",),
    ) if hub_id else {}
    return dict(
        **weights,
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=None,
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        paper_ids="arXiv:2401.09417",
        origin_url="https://github.com/hustvl/Vim",
    )


default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": _cfg(*RELEASED[name]) for name in VARIANTS},
    CUSTOM: _cfg(),
})


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be asked now (None: it answers, or a proxy is set and timm's download
    is left to find out). Asked before a download of released weights, which offline retries for ~30 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        return f"{url.hostname} cannot be reached: {err.strerror or err}"
    return None


def _build(variant: str, pretrained: bool, args: Dict[str, Any]) -> VisionMamba:
    return build_model_with_cfg(
        VisionMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=default_out_indices(args.get("depth", 24)), feature_cls="getter"),
        **args,
    )


def _own_source(args: Dict[str, Any]) -> bool:
    """True when timm is given the weights' source (a file, a URL or a state dict), not the hub's."""
    cfgs = [c for c in (args.get("pretrained_cfg"), args.get("pretrained_cfg_overlay")) if isinstance(c, dict)]
    return any(c.get(key) for c in cfgs for key in ("file", "url", "state_dict"))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    args = dict(VARIANTS.get(variant, {}))
    args.update(kwargs)
    if not pretrained or _own_source(args):
        return _build(variant, pretrained, args)
    from huggingface_hub import try_to_load_from_cache

    hub_id, filename, _ = RELEASED[variant]
    why = hub_unreachable()
    if why is None:
        try:
            return _build(variant, True, args)
        except OSError as err:  # every hub failure (no route, missing file, refused) is an OSError
            why = f"{type(err).__name__}: {err}"
    cached = try_to_load_from_cache(hub_id, filename)
    if isinstance(cached, str):  # downloaded before: the hub is not needed
        model = _build(variant, False, args)
        load_checkpoint(model, cached, drop_head=model.num_classes != 1000)
        return model
    raise RuntimeError(
        f"could not fetch the pretrained weights of {variant}: {filename!r} from the Hugging Face repo {hub_id!r} "
        f"({why}). Download that file by hand and pass checkpoint_path='/path/to/{filename}' (with "
        "pretrained=False) instead."
    )


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti: dim 192, patch 16, 7,148,008 parameters."""
    return _create("vim_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti†: dim 192, patch 16 with stride 8 (730 tokens at 224), 7,250,344 parameters."""
    return _create("vim_tiny_patch16_stride8_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S: dim 384, patch 16, 25,796,584 parameters."""
    return _create("vim_small_patch16_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S†: dim 384, patch 16 with stride 8, 26,001,256 parameters."""
    return _create("vim_small_patch16_stride8_224", pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-B: dim 768, patch 16, 97,598,440 parameters."""
    return _create("vim_base_patch16_224", pretrained, **kwargs)


@register_model
def vim_custom(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """A Vim from its arguments alone (defaults: Vim-Ti's), without released weights."""
    if pretrained:
        raise ValueError(f"{CUSTOM} has no released weights; pass checkpoint_path=... to load your own")
    return _create(CUSTOM, False, **kwargs)


def _register_alias(official: str, ours: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        return _create(ours, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = official
    entrypoint.__doc__ = f"Official name of {ours}."
    register_model(entrypoint)


for _official, _ours in OFFICIAL_ALIASES.items():
    _register_alias(_official, _ours)
