"""SpatialFormer: a four-stage backbone with spatial tokens and bilateral cross-attention.

Stages 1-2 exchange information between M = 64 spatial tokens (an 8x8 grid) and the image
tokens with bilateral cross-attention (BCA) blocks, whose cost is linear in the number of
image tokens; stages 3-4 run joint self-attention over [spatial; image] tokens.

Stage configuration (channels, heads, blocks) follows the supplementary material of the
SpatialFormer paper; the block internals are our documented reading (docs/design.md section 3):
4x4 stride-4 patch embedding, 2x2 stride-2 patch merging between stages (Swin's
PatchMerging), a Linear C_i -> C_{i+1} on the spatial tokens between stages, final
LayerNorm, mean over image and spatial tokens, Linear head.

Models register with timm on `import spatialformer`:

    >>> import spatialformer, timm
    >>> model = timm.create_model("spatialformer_tiny", backend="auto")
    >>> logits = model(torch.randn(1, 3, 224, 224))  # [1, 1000]

They follow timm's model conventions: complete pretrained configs, torch.jit.script, FX
tracing (the BCA attention is a leaf, see layers.py), `set_grad_checkpointing`,
`group_matcher` (layer-wise LR decay), `features_only` / `forward_intermediates`, and
pretrained weights from a local file (`pretrained=True,
pretrained_cfg_overlay=dict(file=PATH)`, mapped by `checkpoint_filter_fn`).
"""
# No `from __future__ import annotations` here or in layers.py: FX copies a traced forward's
# annotations into its generated code, and TorchScript cannot resolve them as strings.
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch import Tensor, nn

from .layers import BCABlock, SABlock, SpatialTokens

__all__ = ["SpatialFormer"]

PATCH_SIZE = 4
TOTAL_STRIDE = 32


@register_notrace_function
def _check_images(images: Tensor, stride: int = TOTAL_STRIDE) -> Tensor:
    """`images` if they are [B, C, H, W] with H and W multiples of 32, else a ValueError.

    A leaf for FX tracing (its checks read shapes) and scriptable.
    """
    if images.dim() != 4 or images.shape[-2] % stride != 0 or images.shape[-1] % stride != 0:
        shape = ", ".join([str(size) for size in images.shape])
        raise ValueError(f"images must be [B, C, H, W] with H and W multiples of {stride}, got ({shape})")
    return images


torch.fx.wrap("_check_images")


class PatchEmbed(nn.Module):
    """4x4 stride-4 convolution + LayerNorm: images [B, 3, H, W] -> tokens [B, H/4, W/4, C] (NHWC)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class SpatialFormerStage(nn.Module):
    """One stage: optional downsampling of both streams, then BCA or SA blocks.

    Image tokens travel as NHWC maps [B, h, w, C]; spatial tokens as [B, M, C]. With
    `grad_checkpointing`, each block recomputes its activations in the backward pass
    (only its inputs are kept).
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        depth: int,
        num_heads: int,
        block_type: str,
        downsample: bool,
        mlp_ratio: float,
        drop_path_rates: Sequence[float],
        bca_mode: str,
        backend: Optional[str],
    ):
        super().__init__()
        self.downsample = PatchMerging(dim_in, dim) if downsample else nn.Identity()
        self.spatial_proj = nn.Linear(dim_in, dim) if dim_in != dim else nn.Identity()
        if block_type == "bca":
            blocks = [
                BCABlock(dim, num_heads, mlp_ratio, drop_path=rate, mode=bca_mode, backend=backend)
                for rate in drop_path_rates
            ]
        elif block_type == "sa":
            blocks = [SABlock(dim, num_heads, mlp_ratio, drop_path=rate, backend=backend) for rate in drop_path_rates]
        else:
            raise ValueError(f"block_type must be 'bca' or 'sa', got {block_type!r}")
        assert len(blocks) == depth
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.downsample(x)
        s = self.spatial_proj(s)
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                s, tokens = checkpoint(block, s, tokens)
            else:
                s, tokens = block(s, tokens)
        return tokens.reshape(batch, height, width, channels), s


class SpatialFormer(nn.Module):
    """SpatialFormer backbone and classifier.

    Input images [B, in_chans, H, W] with H and W multiples of 32. `forward_features`
    returns the final normalised tokens [B, M + N4, C4] (spatial tokens first);
    `forward_spatial_tokens` the final spatial tokens [B, M, C4]; `forward_intermediates`
    the NCHW image maps of the stages (reductions 4, 8, 16, 32).

    backend: kernels for the BCA blocks ("auto", "reference", "triton", "cpu"; None follows
    the process-wide default, see spatialformer.use_backend). bca_mode: "parallel" or
    "sequential".
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256, 320),
        num_heads: Sequence[int] = (2, 4, 8, 10),
        depths: Sequence[int] = (2, 2, 6, 2),
        block_types: Sequence[str] = ("bca", "bca", "sa", "sa"),
        spatial_grid: int = 8,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bca_mode: str = "parallel",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.spatial_tokens = SpatialTokens(embed_dims[0], spatial_grid)

        rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        dim_in = embed_dims[0]
        for i, (dim, heads, depth, block_type) in enumerate(zip(embed_dims, num_heads, depths, block_types)):
            stages.append(
                SpatialFormerStage(
                    dim_in, dim, depth, heads, block_type, i > 0, mlp_ratio, rates[i], bca_mode, backend
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=PATCH_SIZE * 2**i, module=f"stages.{i}"))
            dim_in = dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"spatial_tokens.embedding"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in timm's format (e.g. for timm.optim.param_groups_layer_decay).

        Depth order: the stem (patch embedding and initial spatial tokens), then per stage its
        downsampling (patch merging and spatial-token projection) and its blocks; the final
        norm joins the last block; the head, matched by nothing, comes last. coarse=True:
        one group per stage.
        """
        return dict(
            stem=r"^patch_embed\.|^spatial_tokens\.",
            blocks=r"^stages\.(\d+)\."
            if coarse
            else [
                (r"^stages\.(\d+)\.(?:downsample|spatial_proj)\.", (-1,)),  # before the stage's block 0
                (r"^stages\.(\d+)\.blocks\.(\d+)\.", None),
                (r"^norm\.", (99999,)),  # timm's "same group as the previous one"
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward that also returns the stage outputs as NCHW maps (timm convention).

        indices: last n stages if int, all if None, else the listed stage indices.
        norm: apply the final norm to the last stage's map when it is taken.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        x = _check_images(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.patch_embed(x)
        s = self.spatial_tokens(x.shape[0])
        intermediates = []
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x, s = stage(x, s)
            if i in take_indices:
                feature = self.norm(x) if norm and i == last else x
                intermediates.append(feature.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if len(stages) < len(self.stages):
            raise ValueError("stop_early=True cannot return final features; pass intermediates_only=True")
        return self._final_tokens(x, s), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _final_tokens(self, x: Tensor, s: Tensor) -> Tensor:
        return self.norm(torch.cat([s, x.flatten(1, 2)], dim=1))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> final normalised tokens [B, M + N4, C4], spatial tokens first."""
        x = self.patch_embed(_check_images(x))
        s = self.spatial_tokens(x.shape[0])
        for stage in self.stages:
            x, s = stage(x, s)
        return self._final_tokens(x, s)

    def forward_spatial_tokens(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> the final spatial tokens [B, M, C4] (queries for task decoders)."""
        return self.forward_features(x)[:, : self.spatial_tokens.num_tokens]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SpatialFormer) -> Dict[str, Tensor]:
    """Map a saved checkpoint onto `model`'s state_dict keys (timm's pretrained_filter_fn).

    Accepts a plain state_dict; one wrapped as {"model": ...} or {"state_dict": ...}; the
    safetensors file of `python -m spatialformer.train` (keys "model.*" next to the optimizer's
    "optim.*" and "rng.*"); and DDP / torch.compile key prefixes ("module.", "_orig_mod.").
    The classifier loads when its shape fits the model; otherwise (another num_classes, or
    none) the model keeps its own freshly initialised head. Nothing depends on the image
    size (the patch embedding is a convolution, the spatial tokens a fixed grid, and image
    tokens carry no position embedding), so weights trained at any resolution load as they are.
    """
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if any(key.startswith("model.") for key in state_dict):
        state_dict = {key[len("model.") :]: value for key, value in state_dict.items() if key.startswith("model.")}
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key not in own:
            cleaned.pop(key, None)
        elif key in cleaned and cleaned[key].shape != own[key].shape:
            cleaned[key] = own[key]
    return cleaned


def _create_spatialformer(variant: str, pretrained: bool = False, **kwargs) -> SpatialFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    if pretrained:
        # Weights are matched to the model by their shapes (checkpoint_filter_fn keeps a
        # classifier that fits), so timm must not drop the classifier because the config's
        # class count differs from the model's: a local file may have any class count.
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay.setdefault("num_classes", kwargs.get("num_classes", 1000))
        kwargs["pretrained_cfg_overlay"] = overlay
    return build_model_with_cfg(
        SpatialFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(input_size: Tuple[int, int, int] = (3, 224, 224), **kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": input_size,
        "min_input_size": (input_size[0], TOTAL_STRIDE, TOTAL_STRIDE),
        # forward_features' image tokens (and forward_intermediates' last map) at output stride 32
        "pool_size": (input_size[1] // TOTAL_STRIDE, input_size[2] // TOTAL_STRIDE),
        "crop_pct": 0.9,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": False,
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "spatialformer_tiny.untrained": _cfg(),
        "spatialformer_small.untrained": _cfg(),
        "spatialformer_base.untrained": _cfg(),
    }
)


@register_model
def spatialformer_tiny(pretrained: bool = False, **kwargs) -> SpatialFormer:
    model_args = dict(embed_dims=(64, 128, 256, 320), num_heads=(2, 4, 8, 10), depths=(2, 2, 6, 2))
    return _create_spatialformer("spatialformer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialformer_small(pretrained: bool = False, **kwargs) -> SpatialFormer:
    model_args = dict(embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14), depths=(3, 4, 6, 3))
    return _create_spatialformer("spatialformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialformer_base(pretrained: bool = False, **kwargs) -> SpatialFormer:
    model_args = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(3, 6, 18, 3))
    return _create_spatialformer("spatialformer_base", pretrained, **dict(model_args, **kwargs))
