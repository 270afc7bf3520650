"""Distil FeatherFace V2 (256,156 parameters) from a trained V1 teacher.

    python train_v2.py --teacher_model weights/featherface_v1/last.pth --epochs 400 --batch_size 32 \
        --temperature 4.0 --alpha_initial 0.8 --alpha_final 0.5 --gradient_clip 1.0 \
        --early_stopping_patience 20

Loss = alpha * distillation + (1 - alpha) * MultiBox (layers/distillation.py says exactly what is
distilled); alpha follows layers/alpha_schedule.py. Run machinery (checkpoints, resume,
TensorBoard, AMP, DDP, data checks) is the shared utils/training/trainer.py; the distillation
loop is utils/training/distillation.py.
"""
from __future__ import annotations

import argparse

from utils.errors import non_negative_float, non_negative_int, positive_float, positive_int, run_cli, unit_float
from utils.training.distillation import DEFAULT_TEACHER, DistillationTrainer, build_student
from utils.training.trainer import (DEFAULT_BACKBONE, add_training_args, load_backbone_if_any, log_main,
                                    refuse_to_overwrite, set_seed)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil FeatherFace V2 from a V1 teacher checkpoint.")
    parser.add_argument("--teacher_model", default=None,
                        help="V1-family checkpoint written by train.py or converted by utils.convert_official "
                             f"(default: with --resume the run's own teacher, else {DEFAULT_TEACHER}, where "
                             "train.py writes it)")
    parser.add_argument("--new_teacher", action="store_true",
                        help="with --resume, distil from a --teacher_model whose weights differ from the teacher "
                             "the run was distilled from (refused otherwise)")
    parser.add_argument("--pretrained_backbone", default=DEFAULT_BACKBONE,
                        help="ImageNet MobileNetV1-0.25 weights for the student ('none' = from scratch)")
    g = parser.add_argument_group("distillation")
    g.add_argument("--temperature", type=positive_float, default=4.0, help="softmax temperature T (class KD is scaled by T^2)")
    g.add_argument("--alpha_initial", type=unit_float, default=0.8, help="distillation weight at epoch 1")
    g.add_argument("--alpha_final", type=unit_float, default=0.5,
                   help="end point of alpha's linear decay (reached one epoch after the last; alpha also shrinks "
                        "x0.9 per plateau and is capped by --alpha_late_cap in the last 20%% of epochs)")
    g.add_argument("--alpha_late_cap", type=unit_float, default=0.4,
                   help="cap on alpha in the last 20%% of epochs (1 = no cap)")
    g.add_argument("--kd_conf_threshold", type=unit_float, default=0.5,
                   help="teacher face probability above which box/landmark outputs are distilled")
    g.add_argument("--early_stopping_patience", type=positive_int, default=20,
                   help="validated epochs without improvement (halved in epochs 101-120); every epoch is "
                        "validated unless --val_interval says otherwise")
    g.add_argument("--min_epoch", type=non_negative_int, default=100, help="never stop early before this epoch")
    g.add_argument("--mixup_alpha", type=non_negative_float, default=0.2, help="MixUp Beta(alpha, alpha) (0 = off)")
    g.add_argument("--mixup_prob", type=unit_float, default=0.5, help="probability a batch is mixed up")
    g.add_argument("--cutmix_prob", type=unit_float, default=0.5, help="per-image CutMix probability on batches not mixed up")
    g.add_argument("--dropblock_prob", type=unit_float, default=None,
                   help="DropBlock probability on the student's fused features, training mode only (0 = off; "
                        "default: with --resume the run's own, else V2's 0.1); stored in the checkpoint's model config")
    add_training_args(parser, epochs=400, name="featherface_v2")
    parser.set_defaults(gradient_clip=1.0, decay1=250, decay2=350)
    return parser


def main(args: argparse.Namespace):
    refuse_to_overwrite(args)  # before the teacher or student is built or data checked
    set_seed(args.seed)
    student = build_student(args)  # also fills --teacher_model / --dropblock_prob from a resumed run
    if not args.resume and not args.init_weights:  # --init_weights: a V2 checkpoint, loaded by the Trainer
        load_backbone_if_any(student, args.pretrained_backbone, log_main)
    return DistillationTrainer(args, student).fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
