"""GPU readiness check: run it on the training machine before a long run (under 2 minutes).

    python tools/gpu_check.py                 # exit 0: ready (or no CUDA: skipped); 1: a check failed

What it runs, on the shipped sample photos, through the real Trainer:

1. one AMP training step of V1 and of V2 (distillation from a fresh V1 teacher): the loss is
   finite, the GradScaler is on with a finite scale, the weights stay finite; images/s timed
   over a few steps after a warm-up;
2. CUDA resume equality: V2 (DropBlock draws on the GPU) for 4 steps with AMP, against the same
   run interrupted after 3 steps and resumed; the difference must be within the run-to-run
   noise of two uninterrupted runs (cuDNN / atomics are not bit-exact);
3. the CUDA deformable conv (torchvision's kernel, used on GPUs) against the CPU path
   (models.deform_conv.deform_conv2d_fast) on V1 SSH shapes: outputs and all gradients;
4. with 2 or more GPUs, one 2-rank NCCL DDP step of V1 with AMP: the ranks' weights are
   identical afterwards; images/s over both ranks.

Without CUDA it prints why it skipped and exits 0. `--device cpu` runs the same checks on the
CPU (no AMP, gloo for DDP) to test this script itself; it is not a readiness check.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
CHECKS = ("v1", "v2", "resume", "deform", "ddp")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check that AMP training, resume, the deformable conv and "
                                                 "NCCL DDP work on this machine's GPUs before a long run.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (the check); cpu runs the same steps on the CPU to test this script")
    parser.add_argument("--image_size", type=int, default=640, help="training size of the timed steps")
    parser.add_argument("--batch_size", type=int, default=16, help="images per timed step (per GPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS),
                        help="which checks to run (default: all)")
    return parser


# ----------------------------------------------------------------------------- helpers
def sample_labels(folder: Path, copies: int) -> Path:
    """A label file listing the shipped sample photos `copies` times (absolute paths)."""
    text = (SAMPLE / "label.txt").read_text().replace("# ", f"# {SAMPLE / 'images'}/")
    label = folder / "label.txt"
    label.write_text(text * copies)
    return label


def trainer_args(script, label: Path, folder: Path, name: str, device: str, image_size: int, batch: int,
                 *extra: str) -> argparse.Namespace:
    flags = ["--training_dataset", str(label), "--image_size", str(image_size), "--batch_size", str(batch),
             "--device", device, "--num_workers", "2", "--save_folder", str(folder / "w"),
             "--log_dir", str(folder / "runs"), "--name", name, "--pretrained_backbone", "none", "--quiet",
             "--save_interval", "0", *extra]
    if device == "cuda":
        flags.append("--amp")
    flags += ["--precise_bn_batches", "0"]  # not what is checked here; keeps the check short
    return script.get_args_parser().parse_args(flags)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, warmup: int, steps: int) -> Tuple[float, List[float]]:
    """Run warm-up + timed training steps; returns (images/s of the timed ones, every loss)."""
    from torch.utils.data import DataLoader

    from data.wider_face import detection_collate

    loader = DataLoader(trainer.train_set, batch_size=trainer.args.batch_size, shuffle=False,
                        collate_fn=detection_collate, num_workers=trainer.args.num_workers)
    batches = []
    for images, targets in loader:
        batches.append((images, targets))
        if len(batches) == 2:
            break
    losses, seen, start = [], 0, 0.0
    for k in range(warmup + steps):
        if k == warmup:
            sync(trainer.device)
            start = time.perf_counter()
        images, targets = batches[k % len(batches)]
        losses.append(trainer.train_step(images, targets)["loss"])
        seen += len(targets) if k >= warmup else 0
    sync(trainer.device)
    return seen / (time.perf_counter() - start), losses


def weights_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- checks
def check_amp_step(arch: str, device: str, folder: Path, opts) -> str:
    import train
    import train_v2
    from models import build_model
    from utils.checkpoint import save_checkpoint
    from utils.training.distillation import DistillationTrainer
    from utils.training.trainer import Trainer, set_seed

    label = sample_labels(folder, max(1, -(-opts.batch_size // 3)))
    set_seed(0)
    if arch == "v1":
        args = trainer_args(train, label, folder, "v1", device, opts.image_size, opts.batch_size, "--model", "v1")
        trainer = Trainer(args, build_model("v1"))
    else:
        teacher = folder / "teacher.pth"
        save_checkpoint(teacher, build_model("v1"))
        args = trainer_args(train_v2, label, folder, "v2", device, opts.image_size, opts.batch_size,
                            "--teacher_model", str(teacher))
        trainer = DistillationTrainer(args, build_model("v2"))
    rate, losses = timed_steps(trainer, 2, opts.steps)
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite loss in {losses}")
    if device == "cuda" and not (trainer.amp and trainer.scaler.is_enabled()):
        raise AssertionError("AMP is not active (GradScaler disabled)")
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise AssertionError(f"GradScaler scale is {scale}")
    if not weights_finite(trainer.model):
        raise AssertionError("weights are not finite after the steps")
    amp = f"GradScaler on (scale {scale:g})" if scale is not None else "float32 (no AMP on CPU)"
    return (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {amp}, {rate:.1f} images/s "
            f"(batch {opts.batch_size}, {opts.image_size}x{opts.image_size}, {opts.steps} timed steps)")


def check_resume(device: str, folder: Path, opts) -> str:
    import train
    from utils.checkpoint import load_checkpoint

    label = sample_labels(folder, 1)  # 3 images, batch 2: 2 steps per epoch, 4 in all

    def run(name: str, *extra: str):
        args = trainer_args(train, label, folder, name, device, 320, 2, "--model", "v2", "--epochs", "2", *extra)
        return train.main(args)

    run("full_a")
    run("full_b")
    run("cut", "--max_iters", "3")
    cut = folder / "w" / "cut" / "last.pth"
    saved = load_checkpoint(cut)
    if device == "cuda" and "cuda" not in saved["rng"][0]:
        raise AssertionError("the checkpoint holds no CUDA RNG state")
    run("cut", "--resume", str(cut))
    a, b, r = (load_checkpoint(folder / "w" / n / "last.pth")["model"] for n in ("full_a", "full_b", "cut"))

    def max_diff(x, y):
        return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())

    noise, diff = max_diff(a, b), max_diff(a, r)
    if diff > 10 * noise + 1e-6:
        raise AssertionError(f"resumed weights differ by {diff:.3g}; two uninterrupted runs differ by {noise:.3g}")
    return f"V2 4 steps, interrupted after 3 and resumed: max weight diff {diff:.3g} (run-to-run {noise:.3g})"


def check_deform_conv(device: str) -> str:
    import torchvision.ops

    from models.deform_conv import deform_conv2d_fast

    dev = torch.device(device)
    worst_out = worst_grad = 0.0
    # (Cin, Cout, map) of V1 (C = 52) SSH deformable convs at 640: strides 8, 16, 32
    for cin, cout, size in ((52, 26, 80), (52, 13, 40), (13, 13, 20)):
        g = torch.Generator().manual_seed(cin * 1000 + size)
        x = torch.randn(2, cin, size, size, generator=g)
        offset = torch.rand(2, 18, size, size, generator=g) * 6 - 3
        mask = torch.rand(2, 9, size, size, generator=g) * 2
        weight = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5
        bias = torch.randn(cout, generator=g)
        grad_out = torch.randn(2, cout, size, size, generator=g)
        cpu = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
        gpu = [t.to(dev).requires_grad_() for t in (x, offset, mask, weight, bias)]
        y_cpu = deform_conv2d_fast(cpu[0], cpu[1], cpu[3], cpu[4], 1, 1, 1, cpu[2])
        y_gpu = torchvision.ops.deform_conv2d(gpu[0], gpu[1], gpu[3], gpu[4], (1, 1), (1, 1), (1, 1), gpu[2])
        g_cpu = torch.autograd.grad(y_cpu, cpu, grad_out)
        g_gpu = torch.autograd.grad(y_gpu, gpu, grad_out.to(dev))
        y_cpu, y_gpu = y_cpu.detach(), y_gpu.detach()
        scale = float(y_cpu.abs().max())
        worst_out = max(worst_out, float((y_gpu.cpu() - y_cpu).abs().max()) / scale)
        for a, b in zip(g_cpu, g_gpu):
            worst_grad = max(worst_grad, float((b.cpu() - a).abs().max()) / max(float(a.abs().max()), 1e-12))
    if worst_out > 1e-4 or worst_grad > 1e-3:
        raise AssertionError(f"relative max difference: output {worst_out:.2g}, gradients {worst_grad:.2g}")
    return (f"{'CUDA' if device == 'cuda' else 'CPU'} torchvision kernel vs CPU fast path on 3 V1 SSH shapes: "
            f"relative max diff output {worst_out:.2g}, gradients {worst_grad:.2g}")


def _ddp_rank(rank: int, world: int, port: int, device: str, folder: str, opts, results) -> None:
    import train
    from models import build_model
    from utils.training import distributed as ddp
    from utils.training.trainer import Trainer, set_seed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        label = Path(folder) / "label.txt"
        set_seed(0)
        args = trainer_args(train, label, Path(folder), "ddp", device, opts.image_size, opts.batch_size,
                            "--model", "v1")
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(args, build_model("v1"))
            rate, losses = timed_steps(trainer, 2, opts.steps)
        flat = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
        checksums = ddp.all_gather_object((float(flat.sum()), float(flat.abs().sum())))
        images = ddp.reduce_sums({"r": rate})["r"]
        results[rank] = (checksums, images, losses)
    except Exception:  # noqa: BLE001 - reported by the parent
        results[rank] = traceback.format_exc()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def check_ddp(device: str, folder: Path, opts) -> str:
    import torch.multiprocessing as mp

    sample_labels(folder, max(1, -(-opts.batch_size * 2 // 3)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_ddp_rank, args=(2, port, device, str(folder), opts, results), nprocs=2, join=True)
    for rank in (0, 1):
        if isinstance(results.get(rank), str) or rank not in results:
            raise AssertionError(f"rank {rank} failed:\n{results.get(rank)}")
    (sums0, rate, losses0), (_, _, losses1) = results[0], results[1]
    if sums0[0] != sums0[1]:
        raise AssertionError(f"ranks hold different weights after the steps: {sums0}")
    if not all(math.isfinite(v) for v in losses0 + losses1):
        raise AssertionError(f"non-finite loss: {losses0} / {losses1}")
    backend = "NCCL" if device == "cuda" else "gloo"
    return (f"2-rank {backend} DDP, V1{' AMP' if device == 'cuda' else ''}: identical weights on both ranks, "
            f"{rate:.1f} images/s over both (batch {opts.batch_size} per rank, {opts.image_size}x{opts.image_size})")


# ----------------------------------------------------------------------------- main
def run_check(name: str, fn: Callable[[], str], results: List[Tuple[str, str]]) -> None:
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            detail = fn()
        status = "PASS"
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the others still run
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        tail = log.getvalue().strip().splitlines()[-5:]
        detail += "".join(f"\n       | {line}" for line in tail)
    results.append((status, name))
    print(f"[{status}] {name} ({time.perf_counter() - start:.1f} s): {detail}", flush=True)


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU readiness check skipped: CUDA is not available here (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Run it on the GPU machine "
              "before a long run; `--device cpu` only tests this script.")
        return 0
    start = time.perf_counter()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    where = (f"{torch.cuda.get_device_name(0)} x{gpus}, CUDA {torch.version.cuda}" if gpus
             else "CPU (a test of this script, not a readiness check)")
    print(f"GPU readiness check: {where}, torch {torch.__version__}", flush=True)
    results: List[Tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="featherface_gpu_check_") as tmp:
        os.environ.setdefault("FEATHERFACE_CACHE", str(Path(tmp) / "cache"))
        tmp = Path(tmp)
        for arch in [a for a in ("v1", "v2") if a in args.checks]:
            folder = tmp / f"amp_{arch}"
            folder.mkdir()
            run_check(f"{arch.upper()} AMP training step", lambda f=folder, a=arch: check_amp_step(a, args.device, f, args),
                      results)
        if "resume" in args.checks:
            (tmp / "resume").mkdir()
            run_check("resume equality", lambda: check_resume(args.device, tmp / "resume", args), results)
        if "deform" in args.checks:
            run_check("deformable conv vs CPU path", lambda: check_deform_conv(args.device), results)
        if "ddp" in args.checks and args.device == "cuda" and gpus < 2:
            print(f"[SKIP] NCCL DDP step: needs 2 GPUs, this machine has {gpus}")
        elif "ddp" in args.checks:
            (tmp / "ddp").mkdir()
            run_check("2-rank DDP step", lambda: check_ddp(args.device, tmp / "ddp", args), results)
    failed = [name for status, name in results if status == "FAIL"]
    verdict = f"NOT READY: {', '.join(failed)} failed" if failed else "ready"
    print(f"{verdict} ({len(results) - len(failed)} of {len(results)} checks passed in "
          f"{time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
