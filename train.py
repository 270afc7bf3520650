"""Train FeatherFace V1 (or any registered model) on WIDER FACE-format labels.

    python train.py --network mobile0.25 --epochs 350                      # one GPU
    torchrun --nproc_per_node 4 train.py --network mobile0.25 --epochs 350  # several GPUs
    python train.py --epochs 2 --image_size 320 --batch_size 4 --device cpu # CPU, shipped sample
    python train.py --init_weights weights/featherface_v1_original.pth --lr 1e-4 ...   # fine-tune trained weights
"""
from __future__ import annotations

import argparse

from data.config import CONFIGS
from models import build_model
from utils.checkpoint import config_of, load_checkpoint
from utils.errors import run_cli
from utils.training.trainer import (DEFAULT_BACKBONE, Trainer, add_training_args, load_backbone_if_any, log_main,
                                    refuse_to_overwrite, set_seed)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a FeatherFace detector (V1 by default).")
    parser.add_argument("--network", choices=["mobile0.25"], default="mobile0.25",
                        help="backbone (FeatherFace uses MobileNetV1-0.25)")
    parser.add_argument("--model", choices=sorted(CONFIGS), default=None,
                        help="which FeatherFace to train (default: v1, or the model stored in --init_weights)")
    parser.add_argument("--pretrained_backbone", default=DEFAULT_BACKBONE,
                        help="ImageNet MobileNetV1-0.25 weights ('none' = from scratch)")
    return add_training_args(parser, epochs=350, name="featherface_v1")


def main(args: argparse.Namespace):
    refuse_to_overwrite(args)  # before any model is built or data checked
    set_seed(args.seed)
    if args.model is None and args.init_weights:
        model = build_model(config_of(load_checkpoint(args.init_weights)))  # the Trainer loads its weights
    else:
        model = build_model(args.model or "v1")
    if not args.resume and not args.init_weights:
        load_backbone_if_any(model, args.pretrained_backbone, log_main)
    return Trainer(args, model).fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
