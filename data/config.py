"""Frozen model configurations and the preprocessing constants.

A `ModelConfig` describes a network completely (widths, attention layout, anchors,
variance). It is stored inside every checkpoint, so a checkpoint rebuilds its own model.
Run settings (epochs, lr, paths) are *not* here; they are command-line flags.

Parameter counts per model and module: docs/ARCHITECTURE.md §0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

# BGR channel means subtracted from every image (RetinaFace convention; no scaling).
MEAN_BGR: Tuple[float, float, float] = (104.0, 117.0, 123.0)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one FeatherFace network."""

    name: str
    arch: str  # "v1" (deformable SSH, EfficientDet BiFPN) or "v2" (light student)
    out_channels: int  # C: BiFPN / SSH / head width
    bifpn_cells: int
    backbone_cbam: bool = True
    post_bifpn_cbam: bool = True
    # V1 shuffle after SSH: "free" = parameter-free, "conv" = official conv block.
    shuffle: str = "free"
    # Permutation used by the shuffle; "official" = reshape (B, C/g, g) as the published
    # code does, "standard" = ShuffleNet's (B, g, C/g). Inverse of each other for g=2.
    shuffle_order: str = "official"
    deformable: bool = True  # V1: SSH 3x3 convs are modulated deformable convs (DCNv2)
    cbam_reduction: int = 16
    # V2 regularisation: DropBlock on the fused features, training mode only (issue 4).
    dropblock_prob: float = 0.0
    dropblock_size: int = 3
    min_sizes: Tuple[Tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: Tuple[int, ...] = (8, 16, 32)
    variance: Tuple[float, float] = (0.1, 0.2)
    backbone_channels: Tuple[int, int, int] = (64, 128, 256)
    expected_params: int = 0  # the verified count; checked by tests and validate_parameters

    @property
    def num_anchors(self) -> int:
        return len(self.min_sizes[0])

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model-config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("min_sizes",):
            if key in d:
                d[key] = tuple(tuple(x) for x in d[key])
        for key in ("steps", "variance", "backbone_channels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# Fields that shape the training-mode forward pass only: no weights, no effect in eval mode.
# A run may set them (train_v2.py --dropblock_prob) and still load or resume the same weights.
TRAINING_ONLY_FIELDS = ("dropblock_prob", "dropblock_size")


def weight_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict without TRAINING_ONLY_FIELDS: equal for two networks whose weights fit each other."""
    return {k: v for k, v in config.items() if k not in TRAINING_ONLY_FIELDS}


# The four named models (docs/ARCHITECTURE.md §0).
CONFIGS: Dict[str, ModelConfig] = {
    "v1": ModelConfig(name="v1", arch="v1", out_channels=52, bifpn_cells=3,
                      post_bifpn_cbam=True, shuffle="free", expected_params=488_664),
    "v1_original": ModelConfig(name="v1_original", arch="v1", out_channels=64, bifpn_cells=3,
                               post_bifpn_cbam=True, shuffle="conv", expected_params=592_371),
    "v1_slim": ModelConfig(name="v1_slim", arch="v1", out_channels=24, bifpn_cells=3,
                           post_bifpn_cbam=False, shuffle="free", shuffle_order="standard",
                           expected_params=321_041),
    "v2": ModelConfig(name="v2", arch="v2", out_channels=32, bifpn_cells=2, deformable=False,
                      shuffle="conv", shuffle_order="standard", cbam_reduction=32,
                      dropblock_prob=0.1, dropblock_size=3, expected_params=256_156),
}


def get_config(name: str) -> ModelConfig:
    """Return the named config; unknown names list the known ones."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(CONFIGS))}") from None
