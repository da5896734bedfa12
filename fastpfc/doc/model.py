"""The document embedder: a timm backbone, a squeeze conv and a LayerNorm/BatchNorm embedding head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import LAYOUTS, layout_embedding, layout_size

#: Norm layouts of the head, by name: the norms after each of its two linear layers.
HEAD_NORMS = {
    "ln+bn": lambda d: nn.Sequential(nn.LayerNorm(d), nn.BatchNorm1d(d)),
    "ln": nn.LayerNorm,
    "bn": nn.BatchNorm1d,
}

#: Views of an image whose learned embeddings :meth:`DocumentEmbedder.embed` averages, by name:
#: (side, right, down): a crop of ``side`` times the image's height and width, centred and then
#: moved right and down by those shares of them, resized back to the full size. The camera's
#: framing moves the learned features of a photograph much more than those of a document; their
#: mean over shifted crops moves less.
EMBED_CROPS = {
    "full": ((1.0, 0.0, 0.0),),
    "shifted": ((1.0, 0.0, 0.0), (0.9, -0.05, 0.0), (0.9, 0.05, 0.0), (0.9, 0.0, -0.05), (0.9, 0.0, 0.05)),
}


def crop_view(images: torch.Tensor, side: float, right: float, down: float) -> torch.Tensor:
    """``images`` [B, C, H, W] cropped as one :data:`EMBED_CROPS` view says, resized back to [B, C, H, W]
    (bilinear); the full view (side 1) is ``images`` itself."""
    if side == 1.0:
        return images
    height, width = images.shape[-2:]
    crop_h, crop_w = round(height * side), round(width * side)
    top = min(max(round((height - crop_h) / 2 + down * height), 0), height - crop_h)
    left = min(max(round((width - crop_w) / 2 + right * width), 0), width - crop_w)
    crop = images[..., top:top + crop_h, left:left + crop_w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


class EmbeddingHead(nn.Module):
    """[B, C, H, W] features -> [B, embedding_size]: 1x1 squeeze conv, flatten, then
    Linear -> norms -> Linear -> norms, with no bias and no activation (the recipe's head).

    With ``thumbnail`` = N > 0 the first Linear also sees the input images average-pooled to
    N x N ([B, 3 * N * N], each image's mean removed): the colour layout that a small backbone
    trained briefly loses, given to the head to weigh against the deep features.
    """

    def __init__(self, channels: int, spatial: tuple[int, int], embedding_size: int = 256,
                 squeeze_channels: int = 32, hidden: int = 512, norm: str = "ln+bn", thumbnail: int = 0) -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"unknown head norm {norm!r}; choose one of {sorted(HEAD_NORMS)}")
        self.thumbnail = thumbnail
        self.squeeze = nn.Conv2d(channels, squeeze_channels, kernel_size=1, bias=False)
        inputs = squeeze_channels * spatial[0] * spatial[1] + 3 * thumbnail * thumbnail
        self.layers = nn.Sequential(  # the Flatten (of flat input) keeps earlier checkpoints' parameter names
            nn.Flatten(),
            nn.Linear(inputs, hidden, bias=False), HEAD_NORMS[norm](hidden),
            nn.Linear(hidden, embedding_size, bias=False), HEAD_NORMS[norm](embedding_size),
        )

    def forward(self, features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [B, C, H, W]; ``images`` [B, 3, S, S] (normalised input), used when
        ``thumbnail`` > 0."""
        flat = self.squeeze(features).flatten(1)
        if self.thumbnail:
            pooled = nn.functional.adaptive_avg_pool2d(images, self.thumbnail).flatten(1)
            flat = torch.cat([flat, pooled - pooled.mean(dim=1, keepdim=True)], dim=1)
        return self.layers(flat)


class DocumentEmbedder(nn.Module):
    """timm backbone ``backbone`` + :class:`EmbeddingHead`; images [B, 3, S, S] in [0, 1].

    ``forward`` gives the raw embedding (for the loss); :meth:`embed` the L2-normalised one (for
    inference). ``weights`` is a local file of pretrained backbone weights (nothing is downloaded);
    ``head_thumbnail`` see :class:`EmbeddingHead`.

    With ``layout_weight`` w > 0, :meth:`embed` gives the learned embedding (unit, times
    sqrt(1 - w)) followed by the fixed layout ``layout`` (one of
    :data:`fastpfc.doc.layouts.LAYOUTS`, unit, times sqrt(w)): cosines of such embeddings are w
    parts layout, 1 - w parts learned. The loss trains the learned part (``forward``) alone.
    ``embedding_size`` is what :meth:`embed` gives: the ``embedding_size`` asked for
    (``learned_size``) plus the layout's dimensions (192 for ``colour``, 576 for
    ``lighting_robust``, 960 for ``lighting_robust_edges``, 1740 for either pyramid).
    ``embed_crops`` (one of :data:`EMBED_CROPS`) names the views whose learned embeddings
    :meth:`embed` averages (unit mean of unit vectors): ``full``, the image alone, or ``shifted``,
    the image and four crops of 90% of its side moved by 5% (five forward passes per image).
    """

    def __init__(self, backbone: str = "mobilenetv3_small_050", embedding_size: int = 256, image_size: int = 128,
                 head_norm: str = "ln+bn", weights: str | None = None, head_thumbnail: int = 0,
                 layout_weight: float = 0.0, layout: str = "colour", embed_crops: str = "full") -> None:
        super().__init__()
        import timm  # the training extra; the loss itself does not need it

        if not 0.0 <= layout_weight < 1.0:
            raise ValueError(f"layout_weight must be in [0, 1), got {layout_weight}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        if embed_crops not in EMBED_CROPS:
            raise ValueError(f"unknown embed_crops {embed_crops!r}; choose one of {sorted(EMBED_CROPS)}")

        overlay = {"file": weights} if weights else None
        # features_only: the last feature map, without the classifier's layers (which would hold
        # unused parameters: dead weight for AdamW and an error under DDP)
        self.backbone = timm.create_model(backbone, pretrained=weights is not None, features_only=True,
                                          out_indices=(-1,), pretrained_cfg_overlay=overlay)
        config = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        with torch.no_grad():  # the feature map's shape, probed in eval mode (BatchNorm of 1x1 maps)
            features = self.backbone.eval()(torch.zeros(1, 3, image_size, image_size))[-1]
        self.backbone.train()
        self.head = EmbeddingHead(features.shape[1], tuple(features.shape[2:]), embedding_size, norm=head_norm,
                                  thumbnail=head_thumbnail)
        self.layout_weight, self.layout, self.learned_size = layout_weight, layout, embedding_size
        self.embed_crops = embed_crops
        self.embedding_size = embedding_size + (layout_size(layout) if layout_weight else 0)

    @classmethod
    def from_config(cls, config: dict, weights: str | None = None) -> DocumentEmbedder:
        """The embedder of a ``train.py`` config (as checkpoints and config.json hold it); options
        that older checkpoints lack take the value those were trained with."""
        return cls(config["backbone"], config["embedding_size"], config["image_size"], config["head_norm"], weights,
                   head_thumbnail=config.get("head_thumbnail", 0), layout_weight=config.get("layout_weight", 0.0),
                   layout=config.get("layout", "colour"), embed_crops=config.get("embed_crops", "full"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The learned raw embedding [B, learned_size] (what the loss sees)."""
        normalised = (images - self.mean) / self.std
        return self.head(self.backbone(normalised)[-1], normalised)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, embedding_size] float32: the learned one (averaged over the
        ``embed_crops`` views), followed by the layout when ``layout_weight`` > 0."""
        views = [F.normalize(self(crop_view(images, *view)).float(), dim=1) for view in EMBED_CROPS[self.embed_crops]]
        # one view is already unit: not normalised again, so ``full`` embeds exactly as before the crops
        learned = views[0] if len(views) == 1 else F.normalize(torch.stack(views).sum(dim=0), dim=1)
        if not self.layout_weight:
            return learned
        return torch.cat([learned * (1 - self.layout_weight) ** 0.5,
                          layout_embedding(images, self.layout) * self.layout_weight ** 0.5], dim=1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Set every BatchNorm's running statistics to the plain average over ``batches`` (image
    tensors ``[B, 3, S, S]`` on the model's device), the model's weights left as they are; returns
    how many batches were seen.

    The running averages a short run keeps (momentum 0.1) mostly remember weights that training
    has since changed; in eval mode such a network can give nearly the same embedding to every
    image. Recomputing the statistics with the final weights ("precise BN") removes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    seen = 0
    for images in batches:
        model(images)
        seen += 1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)
    return seen
