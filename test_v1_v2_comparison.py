"""Side-by-side comparison of FeatherFace models: parameters, FLOPs, CPU latency and (with WIDER
val data) easy / medium / hard AP.

    python test_v1_v2_comparison.py --weights weights/featherface_v1_original.pth weights/featherface_v2/last.pth \
        --dataset_folder WIDER_val/images --gt_dir ground_truth --output_md comparison.md
    python test_v1_v2_comparison.py --models v1 v2 --runs 20     # random init: size and speed only

The APs come from utils.evaluation.run.run_widerface, as in test_widerface.py (same detector, same
prediction files).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from models import build_model, count_parameters
from utils.checkpoint import load_model
from utils.errors import FeatherFaceError, check_output_path, positive_int, run_cli
from utils.timing import count_flops, measure_latency
from utils.evaluation.widerface_eval import SETTINGS
from utils.evaluation.predict import file_digest
from utils.evaluation.run import (add_inference_args, build_detector, run_widerface,
                                  weights_run_name)


def load_entries(args: argparse.Namespace) -> List[Tuple[str, str, nn.Module]]:
    """(label, model id, model) for every --weights checkpoint and --models name (random init). A checkpoint's
    label (and prediction folder) is test_widerface.py's run name for it, so it does not depend on the order of
    --weights; two files with one name (a/x/last.pth, b/x/last.pth) get their digests added."""
    entries = []
    for path in args.weights or []:
        model, _ = load_model(path)
        entries.append((weights_run_name(path), f"sha256:{file_digest(path)}", model))
    for name in args.models or []:
        torch.manual_seed(args.seed)
        try:
            model = build_model(name)
        except KeyError as exc:
            raise FeatherFaceError(str(exc).strip("\"'")) from None
        entries.append((f"{name} (random init)", f"random:{name}:seed{args.seed}", model))
    if len(entries) < 2:
        raise FeatherFaceError("give at least two models to compare (--weights A.pth B.pth and/or --models v1 v2)")
    ids: Dict[str, set] = {}
    for label, model_id, _ in entries:
        ids.setdefault(label, set()).add(model_id)
    # The same file given twice keeps its one name (and folder): it is the same model.
    return [(label if len(ids[label]) == 1 else f"{label}_{model_id.split(':')[-1][:8]}", model_id, model)
            for label, model_id, model in entries]


def markdown_table(rows: List[Dict[str, object]], size: int, threads: int) -> str:
    has_ap = any("easy" in row for row in rows)
    head = ["Model", "Config", "Params", f"GFLOPs @{size}", f"CPU ms @{size} ({threads} thr)"]
    head += [s.capitalize() + " AP" for s in SETTINGS] if has_ap else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["config"], f"{row['parameters']:,}", f"{row['gflops']:.3f}", f"{row['cpu_ms']:.1f}"]
        # None: the evaluated images have no face of that setting (AP undefined, n/a in test_widerface.py too).
        cells += [("-" if s not in row else "n/a" if row[s] is None else f"{row[s]:.4f}") for s in SETTINGS] \
            if has_ap else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare FeatherFace models: size, FLOPs, CPU latency, WIDER APs.")
    parser.add_argument("--weights", type=str, nargs="+", default=None, help="checkpoints to compare")
    parser.add_argument("--models", type=str, nargs="+", default=None, help="model names to compare at random init")
    parser.add_argument("--seed", type=int, default=0, help="seed for random-init models")
    parser.add_argument("--input_size", type=int, default=640, help="square input for FLOPs and latency")
    parser.add_argument("--runs", type=positive_int, default=20, help="timed forward passes per model (median shown)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads for the latency runs")
    parser.add_argument("--save_root", type=str, default="runs/compare",
                        help="prediction folders go under here: <save_root>/<model>/predictions, <model> named "
                             "after the weights file as test_widerface.py names its folders (featherface_v2_last)")
    parser.add_argument("--output_md", type=str, default=None, help="write the Markdown table here")
    parser.add_argument("--output_json", type=str, default=None, help="write all numbers as JSON here")
    add_inference_args(parser, require_dataset=False)
    return parser


def main(args: argparse.Namespace) -> List[Dict[str, object]]:
    if (args.dataset_folder is None) != (args.gt_dir is None):
        raise FeatherFaceError("give both --dataset_folder and --gt_dir to compare APs (or neither)")
    for path, flag in ((args.output_md, "--output_md"), (args.output_json, "--output_json")):
        check_output_path(path, flag)  # before any model runs
    check_output_path(args.save_root if args.dataset_folder else None, "--save_root", folder=True)
    torch.set_num_threads(args.threads)
    size = args.input_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 50  # ~ mean-subtracted pixels
    rows = []
    for label, model_id, model in load_entries(args):
        detector = build_detector(args, model)
        row = {"model": label, "config": model.config.name, "parameters": count_parameters(model),
               "gflops": count_flops(model, torch.zeros(1, 3, size, size)) / 1e9,
               # The detector's own network call (batch norms folded, inference mode), as in inference.
               "cpu_ms": measure_latency(lambda: detector.backend(x), args.runs, warmup=2).median_ms}
        if args.dataset_folder is not None:
            folder = Path(args.save_root) / label.replace(" ", "_").replace("(", "").replace(")", "")
            results = run_widerface(args, detector, label, model_id, folder / "predictions", folder_flag="--save_root")
            row.update({s: results[s] for s in SETTINGS}, images_evaluated=results["images_evaluated"])
        rows.append(row)
    table = markdown_table(rows, args.input_size, args.threads)
    print(table)
    if args.output_md:
        Path(args.output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_md).write_text(table + "\n")
    if args.output_json:
        meta = {"input_size": args.input_size, "runs": args.runs, "threads": args.threads, "torch": torch.__version__}
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"settings": meta, "models": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
