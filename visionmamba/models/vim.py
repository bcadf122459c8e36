"""Vision Mamba: patch embedding, middle class token, 24 pre-norm bidirectional Mamba blocks.

Numerically the official hustvl/Vim model (``bimamba_type="v2"``, RMSNorm, fp32 residual, middle class
token, ``if_divide_out=True``) with identical state-dict keys, plus the timm model interface, the official
initialisation and the conversion table from checkpoints (:func:`checkpoint_filter_fn`).
"""
import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, RmsNorm, lecun_normal_, to_2tuple, trunc_normal_
from timm.models import adapt_input_conv, register_notrace_function, register_notrace_module
from timm.models import checkpoint as grad_checkpoint
from timm.models._features import feature_take_indices

from visionmamba.files import PathLike
from visionmamba.models.mixer import BiMambaMixer
from visionmamba.models.pos_embed import grid_from_pos_embed, pos_embed_resample, split_class_token, with_class_token
from visionmamba.models.weights import StateDict, load_weights
from visionmamba.ops import norm, scan
from visionmamba.ops.scan import BACKENDS

Device = Optional[Union[str, torch.device]]
POOLS = ("token", "avg")  # the middle class token (official), or the mean of the patch tokens


@register_notrace_module  # a leaf for torch.fx: its input checks depend on the input's shape
class PatchEmbed(nn.Module):
    """Image (batch, C, H, W) -> patch tokens (batch, H' * W', dim), raster order (row slow, column fast).

    A convolution with kernel ``patch_size`` and ``stride`` <= ``patch_size`` (8 for the long-sequence
    models); the grid side is ``(size - patch) // stride + 1``.
    """

    def __init__(
        self,
        *,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        dynamic_img_size: bool = True,
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not 0 < stride <= patch_size:
            raise ValueError(f"stride must be in [1, patch_size={patch_size}], got {stride}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.stride = stride
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.check_size(self.img_size[0], self.img_size[1])
        self.grid_size = self.grid_for(self.img_size[0], self.img_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, device=device, dtype=dtype)

    def grid_for(self, height: int, width: int) -> Tuple[int, int]:
        return ((height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1)

    def fitting_side(self, side: int) -> int:
        """The side nearest to ``side`` that the patch grid fits."""
        steps = (max(side - self.patch_size, 0) + self.stride // 2) // self.stride  # rounded to the nearest
        return self.patch_size + steps * self.stride

    def check_size(self, height: int, width: int) -> None:
        for side in (height, width):
            if side < self.patch_size or (side - self.patch_size) % self.stride:
                raise ValueError(
                    f"image size {height}x{width} does not fit patch {self.patch_size} / stride {self.stride}: "
                    f"each side must be >= {self.patch_size} and divisible by {self.stride} (the nearest that fits: "
                    f"{self.fitting_side(height)}x{self.fitting_side(width)}); resize or crop the input"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D image batch (batch, {self.in_chans}, H, W), got shape {list(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels (batch, {self.in_chans}, H, W), got shape "
                f"{list(x.shape)}; convert the images (e.g. grey -> RGB) or build the model with "
                f"in_chans={x.shape[1]}"
            )
        height, width = x.shape[-2], x.shape[-1]
        if not self.dynamic_img_size and (height != self.img_size[0] or width != self.img_size[1]):
            raise ValueError(
                f"expected input size {self.img_size[0]}x{self.img_size[1]}, got {height}x{width}; build the "
                f"model with img_size={height} or dynamic_img_size=True"
            )
        self.check_size(height, width)
        return self.proj(x).flatten(2).transpose(1, 2)


@register_notrace_function
def insert_cls_token(tokens: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor,
                     table_grid: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """Patch tokens (batch, M, dim) -> (batch, M + 1, dim): the class token inserted at M // 2 and the position
    table (1, M0 + 1, dim) of ``table_grid`` added, resampled to ``grid`` when they differ. (A leaf for
    torch.fx: the resampling depends on the input size.)"""
    return with_class_token(tokens, cls_token) + pos_embed_resample(pos_embed, table_grid, grid)


class Block(nn.Module):
    """Pre-norm residual block: ``residual += drop_path(previous mixer output)``; ``mixer(norm(residual))``.

    The residual stream is kept in float32 (official ``residual_in_fp32=True``; float64 models keep float64);
    the norm output is cast back to the dtype of the incoming hidden state, as in the official fused add-norm
    kernel.
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 16,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        scan_backend: str = "auto",
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.mixer = BiMambaMixer(dim, d_state=d_state, scan_backend=scan_backend, device=device, dtype=dtype)
        self.norm = RmsNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], own_residual: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden (batch, L, dim), residual (batch, L, dim) float32 (float64 for float64 models) or None -> (new
        hidden, new residual). ``own_residual``: the caller hands the residual over (the model's block loop),
        so inference on the Triton path may update it in place instead of allocating the new one."""
        added = hidden if residual is None else self.drop_path(hidden)
        fused = self.fused_add_norm(added, residual, own_residual)
        if fused is not None:
            normed, residual = fused
        else:
            wide = torch.promote_types(hidden.dtype, torch.float32)
            residual = added.to(wide) if residual is None else residual + added
            normed = self.norm(residual).to(hidden.dtype)
        return self.mixer(normed), residual

    @torch.jit.ignore
    def fused_add_norm(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                       inplace: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return fused_add_norm(self.mixer.scan_backend, self.norm, hidden, residual, inplace)


def fused_add_norm(scan_backend: str, norm_module: nn.Module, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                   inplace: bool = False) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The residual add and RMSNorm as one fused op ((normed, new residual), :func:`norm.fused`) where it
    applies, else None (the caller runs them as plain operators): an RMSNorm, below float64 (its residual is
    float32), not under torch.fx's symbolic tracing (parameters are proxies there: its graph keeps the plain
    operators); on the Triton scan path, or on the ``cpu`` one when run eagerly in float32 or bfloat16 (traced,
    compiled and exported graphs keep the plain operators there, which their compilers fuse and their
    converters know). The one place this is decided, for the blocks and the final norm."""
    weight = getattr(norm_module, "weight", None)
    if not isinstance(norm_module, RmsNorm) or isinstance(weight, torch.fx.Proxy) or hidden.dtype == torch.float64:
        return None
    backend = scan.resolve_backend(scan_backend, weight.device)
    if backend == "cpu" and (hidden.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu"
                             or torch.jit.is_tracing() or torch.compiler.is_compiling()
                             or torch.compiler.is_exporting() or scan.exporting_onnx()):
        return None
    if backend not in ("triton", "cpu"):
        return None
    return norm.fused(hidden, residual, weight, norm_module.eps, inplace)


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """The official schedule: rates rising linearly from 0 to ``rate`` over the blocks, in float32 as
    torch.linspace computes them (on the CPU whatever the default device, e.g. under ``torch.device("meta")``)."""
    return torch.linspace(0, rate, depth, device="cpu").tolist()


class VisionMamba(nn.Module):
    """Vim: a plain, isotropic backbone of bidirectional Mamba blocks with a middle class token.

    Constructor arguments are keyword-only; there is no ``**kwargs`` sink. ``dynamic_img_size`` lets a
    model built at one resolution run at any other whose sides fit the patch grid; the position table is
    then resampled on the fly. ``global_pool`` picks the feature the head reads: ``"token"`` (the middle
    class token, as officially) or ``"avg"`` (the mean of the patch tokens). ``device`` and ``dtype`` are
    where and how the parameters are created (timm's factory arguments; ``"meta"`` builds without memory).
    """

    def __init__(
        self,
        *,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
        dynamic_img_size: bool = True,
        scan_backend: str = "auto",
        device: Device = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        assert global_pool in POOLS, f"global_pool must be one of {POOLS}, got {global_pool!r}"
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, stride=stride, in_chans=in_chans, embed_dim=embed_dim,
            dynamic_img_size=dynamic_img_size, **dd,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # Mixer j's output is dropped with rate dpr[j]; it is added to the residual in block j + 1 (or
        # the final norm), hence block i uses dpr[i - 1] and the final add uses drop_path_rate.
        dpr = [0.0] + drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList(
            Block(embed_dim, d_state=d_state, drop_path=dpr[i], norm_eps=norm_eps, scan_backend=scan_backend, **dd)
            for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps, **dd)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=stride, module=f"layers.{i}") for i in range(depth)
        ]
        official_init(self)

    def init_weights(self) -> None:
        """Draw every parameter anew as construction does: each module's default initialisation in
        construction order, then the official pass. For timm's meta -> ``to_empty`` -> ``init_weights``
        workflow; with the same seed the weights equal those of a model built directly."""
        self.patch_embed.proj.reset_parameters()
        if isinstance(self.head, nn.Linear):
            self.head.reset_parameters()
        for block in self.layers:
            block.mixer.reset_parameters()
            block.norm.reset_parameters()
        self.norm_f.reset_parameters()
        official_init(self)

    # ----------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names exempt from weight decay. As in the official recipe, ``A_log`` is decayed."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none), on the model's device and dtype, in its mode."""
        if global_pool is not None:
            assert global_pool in POOLS, f"global_pool must be one of {POOLS}, got {global_pool!r}"
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    def load_pretrained(self, path: str) -> None:
        """Hook for timm's ``custom_load``: read an official ``.pth`` (or any format we accept).

        A model built with another number of classes keeps its freshly initialised head (fine-tuning).
        """
        load_checkpoint(self, path, drop_head=True)

    @torch.jit.ignore
    def set_scan_backend(self, backend: str) -> None:
        """Run every block's scan on ``backend`` ("auto" or one of :data:`visionmamba.ops.scan.BACKENDS`)."""
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown selective-scan backend {backend!r}; expected 'auto' or one of {list(BACKENDS)}")
        for block in self.layers:
            block.mixer.scan_backend = backend

    # ------------------------------------------------------------------------------------------ forward
    def cls_index(self, num_patches: int) -> int:
        """Position of the class token for a sequence of ``num_patches`` patches."""
        return num_patches // 2

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Image -> (tokens (batch, M + 1, dim) with the class token at M // 2 and positions added, grid)."""
        grid = self.patch_embed.grid_for(x.shape[-2], x.shape[-1])
        tokens = insert_cls_token(self.patch_embed(x), self.cls_token, self.pos_embed, self.patch_embed.grid_size, grid)
        return self.pos_drop(tokens), grid

    @torch.jit.ignore
    def _run_block(
        self, block: Block, hidden: torch.Tensor, residual: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One block, recomputed in the backward when gradient checkpointing is on (forward_features inlines
        this loop body: TorchScript cannot pass a submodule)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return grad_checkpoint(block, hidden, residual)
        return block(hidden, residual, True)  # the loops own their residual stream

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """norm_f(residual + drop_path(hidden)) in hidden's dtype (one Triton kernel on the Triton path)."""
        added = self.drop_path(hidden)
        fused = self._fused_final_norm(added, residual)
        if fused is not None:
            return fused[0]
        return self.norm_f(residual + added).to(hidden.dtype)

    @torch.jit.ignore
    def _fused_final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(self.norm_f, RmsNorm):  # e.g. a scripted model's: its blocks cannot be indexed here
            return None
        return fused_add_norm(self.layers[0].mixer.scan_backend, self.norm_f, hidden, residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (batch, C, H, W) -> all tokens after the final norm (batch, M + 1, dim), class token at M // 2."""
        hidden, _ = self._embed(x)
        residual: Optional[torch.Tensor] = None
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                hidden, residual = grad_checkpoint(block, hidden, residual)
            else:
                hidden, residual = block(hidden, residual, True)  # this loop owns the residual stream
        assert residual is not None, "a Vim has at least one block"
        return self._final_norm(hidden, residual)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (batch, L, dim) -> logits (batch, classes), or the pooled feature (batch, dim): the middle
        class token, or with ``global_pool="avg"`` the mean of the patch tokens."""
        if self.global_pool == "avg":
            x = split_class_token(x)[1].mean(dim=1)
        else:
            x = x[:, self.cls_index(x.shape[1] - 1)]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of selected blocks, as in timm's ViT.

        A block's output is the residual stream after it (``residual + mixer output``), optionally
        passed through the final norm (``norm=True``). ``output_fmt`` "NCHW" gives (batch, dim, H', W')
        maps of the patch tokens, "NLC" gives (batch, M, dim) tokens; the class token is removed and, with
        ``return_prefix_tokens``, returned beside each map as (batch, 1, dim).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        hidden, grid = self._embed(x)
        blocks = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[: max_index + 1]
        residual = None
        intermediates = []
        for i, block in enumerate(blocks):
            hidden, residual = self._run_block(block, hidden, residual)
            if i in take_indices:
                out = self._final_norm(hidden, residual) if norm else (residual + hidden).to(hidden.dtype)
                cls_tok, tokens = split_class_token(out)
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((tokens, cls_tok) if return_prefix_tokens else tokens)
        if intermediates_only:
            return intermediates
        if len(blocks) < len(self.layers):
            for block in self.layers[len(blocks) :]:
                hidden, residual = self._run_block(block, hidden, residual)
        return self._final_norm(hidden, residual), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop blocks after the last wanted index (for ``features_only``)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


@torch.no_grad()
def official_init(model: VisionMamba) -> None:
    """The official initialisation (docs/specification.md §4), in the official order of random draws.

    Patch conv: LeCun normal, bias 0. Head: truncated normal std 0.02, bias 0. ``pos_embed`` and
    ``cls_token``: truncated normal std 0.02. Then the Mamba "GPT-2" pass: every Linear bias is zeroed
    except the flagged ``dt_proj.bias`` (so ``dt_proj_b.bias`` becomes 0, as officially), and each
    ``out_proj.weight`` is redrawn Kaiming-uniform and divided by sqrt(depth).
    """
    lecun_normal_(model.patch_embed.proj.weight)
    nn.init.zeros_(model.patch_embed.proj.bias)
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    model.apply(partial(_mamba_init, depth=len(model.layers)))


def _mamba_init(module: nn.Module, depth: int) -> None:
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    if isinstance(module, BiMambaMixer):
        nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        module.out_proj.weight /= math.sqrt(depth)


def checkpoint_filter_fn(state_dict: StateDict, model: VisionMamba, *, drop_head: bool = False) -> StateDict:
    """The conversion table from a checkpoint's weights to ``model``'s, every key on purpose.

    * Official, ours and safetensors files use the same names: kept as they are.
    * ``pos_embed`` of another grid: resampled (class row kept at the middle; square source grid).
    * ``patch_embed.proj.weight`` for another number of input channels: adapted as timm adapts first
      convolutions (e.g. RGB weights summed for one grey channel).
    * ``head.*``: dropped when the model has no head (``num_classes=0``); with ``drop_head``, a checkpoint
      head of another class count (or none) is replaced by the model's own, freshly initialised one
      (fine-tuning on a new label set).
    Anything else that does not fit is reported by the loader.
    """
    state = dict(state_dict)
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape[1] != model.pos_embed.shape[1] and pos.shape[2] == model.embed_dim:
        state["pos_embed"] = pos_embed_resample(pos, grid_from_pos_embed(pos.shape[1]), model.patch_embed.grid_size)
    conv = state.get("patch_embed.proj.weight")
    if conv is not None and conv.dim() == 4 and conv.shape[1] != model.patch_embed.in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(model.patch_embed.in_chans, conv)
    head = model.head
    if isinstance(head, nn.Identity):
        for key in ("head.weight", "head.bias"):
            state.pop(key, None)
    elif drop_head and tuple(getattr(state.get("head.weight"), "shape", ())) != tuple(head.weight.shape):
        state["head.weight"], state["head.bias"] = head.weight.detach(), head.bias.detach()
    return state


def describe_weights(state: Mapping[str, torch.Tensor]) -> str:
    """What a Vim state dict is, for an error: "a Vim of width 384, depth 24, patch 16, 1000 classes"."""
    conv = state.get("patch_embed.proj.weight")
    if conv is None or conv.dim() != 4:
        return "no Vim weights (no patch_embed.proj.weight)"
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    head = state.get("head.weight")
    classes = f"{head.shape[0]} classes" if head is not None else "no head"
    return f"a Vim of width {conv.shape[0]}, depth {depth}, patch {conv.shape[-1]}, {conv.shape[1]} channels, {classes}"


def load_checkpoint(
    model: VisionMamba,
    path: PathLike,
    *,
    use_ema: bool = False,
    strict: bool = True,
    drop_head: bool = False,
    contents: Optional[Mapping[str, Any]] = None,
) -> Dict[str, List[str]]:
    """Load an official ``.pth``, one of ours, a bare/DDP state dict or a safetensors file into ``model``.

    ``use_ema`` picks the EMA weights of a container; ``drop_head`` keeps the model's own (fresh) head when
    the checkpoint's has another class count. Returns ``{"missing": [...], "unexpected": [...]}`` (empty
    lists after a strict load). With ``strict=False`` mis-shaped tensors are skipped and reported as missing.
    ``contents``: the file already read (:func:`~visionmamba.models.weights.read_file`).
    """
    return load_weights(model, path, use_ema=use_ema, strict=strict, filter_fn=partial(checkpoint_filter_fn, drop_head=drop_head),
                        describe=describe_weights, contents=contents)
