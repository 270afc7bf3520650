"""Check every FeatherFace model's parameter count against its verified target.

    python validate_parameters.py            # all models: table, FLOPs, output shapes
    python validate_parameters.py --model v2 --json

Exit 0 when every total matches its target, 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

import torch

from data.config import CONFIGS
from models import build_model, count_parameters
from utils.inference.detector import OUTPUT_NAMES
from utils.errors import run_cli
from utils.timing import count_flops


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Validate FeatherFace parameter counts (exit 1 on mismatch).")
    parser.add_argument("--model", choices=["all", *CONFIGS], default="all", help="model to check (default: all)")
    parser.add_argument("--image_size", type=int, default=640, help="square input size for FLOPs and shapes")
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP count (faster)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return parser


def inspect_model(name: str, image_size: int, flops: bool) -> Dict[str, Any]:
    """Per-module parameter counts, total vs target, FLOPs and output shapes for one model."""
    model = build_model(name).eval()
    report: Dict[str, Any] = {
        "model": name,
        "modules": {k: count_parameters(m) for k, m in model.module_groups().items()},
        "total": count_parameters(model),
        "target": model.config.expected_params,
    }
    report["ok"] = report["total"] == report["target"]
    x = torch.zeros(1, 3, image_size, image_size)
    if flops:  # the one FLOP counter (deformable convs counted as their dense equivalent)
        report["gflops"] = count_flops(model, x) / 1e9
    with torch.inference_mode():
        outputs = model(x)
    report["output_shapes"] = {n: list(t.shape) for n, t in zip(OUTPUT_NAMES, outputs)}
    return report


def format_table(reports: List[Dict[str, Any]], image_size: int) -> str:
    names = [r["model"] for r in reports]
    rows = [["module", *names]]
    for key in reports[0]["modules"]:
        rows.append([key, *[f"{r['modules'][key]:,}" for r in reports]])
    rows.append(["total", *[f"{r['total']:,}" for r in reports]])
    rows.append(["target", *[f"{r['target']:,}" for r in reports]])
    rows.append(["match", *["OK" if r["ok"] else "MISMATCH" for r in reports]])
    if "gflops" in reports[0]:
        rows.append([f"GFLOPs @{image_size}", *[f"{r['gflops']:.3f}" for r in reports]])
    rows.append([f"outputs @{image_size}", *["x".join(map(str, r["output_shapes"]["classifications"][:2])) + "x{4,2,10}" for r in reports]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def main(args: argparse.Namespace) -> int:
    names = list(CONFIGS) if args.model == "all" else [args.model]
    reports = [inspect_model(n, args.image_size, not args.no_flops) for n in names]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print(format_table(reports, args.image_size))
        for r in reports:
            if not r["ok"]:
                print(f"MISMATCH: {r['model']} has {r['total']:,} parameters, target {r['target']:,}", file=sys.stderr)
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
