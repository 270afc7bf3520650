"""Import a checkpoint written by the published FeatherFace code into our `v1_original` model.

The published code (dohun-mat/FeatherFace, fokouarnaud/featherface-train) saves a plain
state dict whose names follow its module layout (`bacbkbone_0_cbam.ChannelGate.mlp.1.weight`,
`ssh1.conv3X3.0.offset_conv.weight`, `ClassHead.0.conv1x1.bias`, ...). The network is the same
as ours (docs/ARCHITECTURE.md §5: 592,371 parameters), so conversion is a pure renaming: every
source key must match exactly one rule of `RULES`, every target key must be filled, every
shape must agree. Nothing is guessed; anything else is a CheckpointError naming the keys.

Usage: python -m utils.convert_official SRC DST
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from utils.checkpoint import (OURS_ONLY, PUBLISHED_ONLY, load_state_strict, save_checkpoint, show_keys,
                              state_dict_hint, state_mismatch)
from utils.errors import CheckpointError, run_cli

PathLike = Union[str, Path]

MODEL_NAME = "v1_original"  # the only configuration the published code builds (C=64, 6 CBAM, conv shuffle)

# Names written by wrappers or profilers, not by the network: DataParallel prefixes every key
# with "module."; thop's profile() registers `total_ops` / `total_params` buffers on every module.
_WRAPPER_PREFIX = "module."
_PROFILER_SUFFIXES = ("total_ops", "total_params")

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_SSH_BRANCHES = {"conv3X3": "conv3x3", "conv5X5_1": "conv5x5_1", "conv5X5_2": "conv5x5_2",
                 "conv7X7_2": "conv7x7_2", "conv7x7_3": "conv7x7_3"}
_HEADS = {"ClassHead": "class_head", "BboxHead": "bbox_head", "LandmarkHead": "landmark_head"}


def _cbam_rules(source: str, target: str) -> List[Tuple[str, str]]:
    """CBAM: ChannelGate.mlp is Sequential(Flatten, Linear, ReLU, Linear), so Linears sit at 1 and 3."""
    return [
        (rf"{source}\.ChannelGate\.mlp\.1\.(weight|bias)", rf"{target}.channel_gate.fc1.\1"),
        (rf"{source}\.ChannelGate\.mlp\.3\.(weight|bias)", rf"{target}.channel_gate.fc2.\1"),
        (rf"{source}\.SpatialGate\.spatial\.conv\.weight", f"{target}.spatial_gate.conv.weight"),
        (rf"{source}\.SpatialGate\.spatial\.bn\.{_BN}", rf"{target}.spatial_gate.bn.\1"),
    ]


def _build_rules() -> List[Tuple[re.Pattern, str]]:
    """(full-match pattern on the published name, replacement template) pairs."""
    rules: List[Tuple[str, str]] = [
        # MobileNetV1-0.25 stages 1-3: same names (IntermediateLayerGetter keeps `body.stageN`).
        (r"body\.(stage[123]\.\d+\.\d+\.(?:weight|bias|running_mean|running_var|num_batches_tracked))", r"body.\1"),
    ]
    for i in range(3):
        rules += _cbam_rules(rf"bacbkbone_{i}_cbam", f"backbone_cbam.{i}")  # [sic] in the published code
        rules += _cbam_rules(rf"bif_cbam_{i}", f"bifpn_cbam.{i}")
    rules += [
        # BiFPN fusion weights (p5_w2 keeps its unused third entry).
        (r"bifpn\.(\d+)\.(p4_w1|p3_w1|p4_w2|p5_w2)", r"bifpn.\1.\2"),
        # SeparableConvBlock: the convs sit inside Conv2dStaticSamePadding (`.conv`).
        (r"bifpn\.(\d+)\.(conv4_up|conv3_up|conv4_down|conv5_down)\.depthwise_conv\.conv\.weight",
         r"bifpn.\1.\2.depthwise.weight"),
        (r"bifpn\.(\d+)\.(conv4_up|conv3_up|conv4_down|conv5_down)\.pointwise_conv\.conv\.(weight|bias)",
         r"bifpn.\1.\2.pointwise.\3"),
        (rf"bifpn\.(\d+)\.(conv4_up|conv3_up|conv4_down|conv5_down)\.bn\.{_BN}", r"bifpn.\1.\2.bn.\3"),
        # First cell's 1x1 projections: Sequential(Conv2dStaticSamePadding, BN).
        (r"bifpn\.0\.(p[345]_down_channel(?:_2)?)\.0\.conv\.(weight|bias)", r"bifpn.0.\1.0.\2"),
        (rf"bifpn\.0\.(p[345]_down_channel(?:_2)?)\.1\.{_BN}", r"bifpn.0.\1.1.\2"),
    ]
    for level in range(3):
        for branch, ours in _SSH_BRANCHES.items():
            # Deformable conv (offset / modulator / regular conv) at .0, BN at .1.
            rules += [
                (rf"ssh{level + 1}\.{branch}\.0\.((?:offset_conv|modulator_conv)\.(?:weight|bias)|regular_conv\.weight)",
                 rf"ssh.{level}.{ours}.0.\1"),
                (rf"ssh{level + 1}\.{branch}\.1\.{_BN}", rf"ssh.{level}.{ours}.1.\1"),
            ]
        # Shuffle block: same Sequential indices (convs at 1, 3, 5; BNs at 2, 4, 6).
        rules += [
            (rf"ssh{level + 1}_cs\.([135])\.weight", rf"shuffle.{level}.\1.weight"),
            (rf"ssh{level + 1}_cs\.([246])\.{_BN}", rf"shuffle.{level}.\1.\2"),
        ]
    for source, target in _HEADS.items():
        rules.append((rf"{source}\.([012])\.conv1x1\.(weight|bias)", rf"{target}.convs.\1.\2"))
    return [(re.compile(p), r) for p, r in rules]


RULES: List[Tuple[re.Pattern, str]] = _build_rules()


def _rename(name: str) -> Optional[str]:
    """Our name for a published key, None when no rule matches."""
    hits = [(m, r) for m, r in ((p.fullmatch(name), r) for p, r in RULES) if m]
    if len(hits) > 1:  # the rules are meant to be disjoint; this is a bug here, not in the file
        raise CheckpointError(f"key {name!r} matches {len(hits)} conversion rules (expected exactly 1)")
    return hits[0][0].expand(hits[0][1]) if hits else None


def convert_key(name: str) -> str:
    """Our name for one published state-dict key; CheckpointError if no rule matches."""
    new = _rename(name)
    if new is None:
        raise CheckpointError(f"key {name!r} matches no conversion rules")
    return new


def _strip_wrappers(state: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """Drop thop profiling entries and DataParallel's `module.` prefix."""
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _PROFILER_SUFFIXES:
            continue
        bare = key[len(_WRAPPER_PREFIX):] if key.startswith(_WRAPPER_PREFIX) else key
        if bare in out:
            raise CheckpointError(f"{source} holds {bare!r} both with and without the 'module.' prefix")
        out[bare] = value
    return out


def convert_state_dict(official: Dict[str, torch.Tensor], target: Optional[Dict[str, torch.Tensor]] = None,
                       source: str = "state dict") -> Dict[str, torch.Tensor]:
    """Rename a published FeatherFace state dict to our `v1_original` names.

    Every source key must be consumed by exactly one rule and every key of `target` (our
    model's state_dict; default: a freshly built v1_original) filled with a tensor of the same
    shape. Otherwise raises CheckpointError naming the offending keys (`source` names the file).
    """
    if not isinstance(official, dict) or not official:
        raise CheckpointError(f"{source} is not a non-empty state dict")
    state = _strip_wrappers(official, source)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source} is not a state dict: non-tensor entries {show_keys(not_tensors, 8)}")
    if any(k.startswith(OURS_ONLY) for k in state) and not any(k.startswith(PUBLISHED_ONLY) for k in state):
        raise CheckpointError(f"{source} is already in this repository's naming, not the published one, so there "
                              f"is nothing to convert.{state_dict_hint(state)}")

    converted: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    unknown = []
    for key, value in state.items():
        new = _rename(key)
        if new is None:
            unknown.append(key)
        elif new in converted:
            raise CheckpointError(f"{source}: keys {origin[new]!r} and {key!r} both map to {new!r}")
        else:
            converted[new], origin[new] = value, key

    if target is None:
        from models import build_model  # local import: converting needs the model, parsing rules does not

        target = build_model(MODEL_NAME).state_dict()
    # Reported in network order (file order for keys without a rule), so the first layer that
    # does not fit comes first.
    mismatch = state_mismatch(target, converted)
    missing = mismatch.missing
    wrong = [f"{origin[k]} {tuple(converted[k].shape)} (expected {tuple(target[k].shape)} for {k})"
             for k in mismatch.wrong_shape]
    unexpected = [origin[k] for k in mismatch.unexpected]
    if unknown or missing or wrong or unexpected:
        raise CheckpointError(
            f"{source} is not a published FeatherFace {MODEL_NAME} checkpoint (C=64, 6 CBAM, conv shuffle, "
            f"deformable SSH): keys with no conversion rule: {show_keys(unknown, 8)}; "
            f"our keys left unfilled: {show_keys(missing, 8)}; wrong shapes: {show_keys(wrong, 4)}; "
            f"keys our model does not have: {show_keys(unexpected, 8)}"
        )
    return {k: converted[k] for k in target}  # our key order


def load_official(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a published checkpoint (a plain state dict, or a dict holding one under 'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Tensors only: a third-party file must not run code while loading.
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/pickled-object files raise many types
        raise CheckpointError(f"cannot read {path} as a torch state dict (truncated, corrupt or not a "
                              f"tensor-only file): {exc}") from exc
    if isinstance(blob, dict) and blob.get("format") == "featherface":
        raise CheckpointError(f"{path} is already a FeatherFace checkpoint of this repository; nothing to convert")
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a state dict")
    return blob


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_file(src: PathLike, dst: PathLike) -> torch.nn.Module:
    """Convert a published checkpoint into one of our full checkpoints; returns the loaded model (eval)."""
    from models import build_model

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"refusing to overwrite the source file {src}; choose another destination")
    model = build_model(MODEL_NAME)
    state = convert_state_dict(load_official(src), model.state_dict(), str(src))
    load_state_strict(model, state, str(src))
    model.eval()
    note = (f"converted by utils.convert_official from the published FeatherFace state dict "
            f"{src.name} (sha256 {_sha256(src)})")
    save_checkpoint(dst, model, source=note)
    return model


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint of the published FeatherFace code into a v1_original checkpoint.")
    parser.add_argument("src", type=Path, help="published state dict (.pth), e.g. featherface_v1_original_widerface.pth")
    parser.add_argument("dst", type=Path, help="where to write our checkpoint (model config included)")
    return parser


def main(args: argparse.Namespace) -> None:
    model = convert_file(args.src, args.dst)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {MODEL_NAME}, {len(model.state_dict())} tensors, {params:,} parameters")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
