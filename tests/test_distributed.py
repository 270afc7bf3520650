"""DDP runs whose ranks agree: reduced metrics, shared decisions, exact resume (CPU, gloo).

The fast tests fork two gloo ranks and check the collectives the trainer relies on; the slow
ones run train.py / train_v2.py under torchrun, each bounded by a timeout so a hang fails."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.conftest import ROOT
import train
from tests.test_train import SAMPLE, make_args
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import FeatherFaceError
from utils.training import distributed as ddp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, queue, fn):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"error: {exc!r}"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, timeout: float = 60.0):
    """fn(rank) in `world` forked gloo processes; their results in rank order. A hang fails."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, queue, fn)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _collectives(rank):
    local = {"loss": 1.0 + rank, "task": 10.0 * (rank + 1)}
    return {
        "sum": ddp.reduce_sums(local),
        "max": ddp.reduce_sums({"t": 3.0 - rank}, op="max"),
        "any": (ddp.any_rank(rank == 1), ddp.any_rank(False)),
        "bcast": ddp.broadcast_object({"reason": f"from rank {rank}"}),
        "gather": ddp.all_gather_object(rank * 7),
        "world": (ddp.get_rank(), ddp.get_world_size()),
    }


def test_collectives_agree_across_two_gloo_ranks():
    r0, r1 = run_ranks(_collectives)
    assert r0["sum"] == r1["sum"] == {"loss": 3.0, "task": 30.0}
    assert r0["max"] == r1["max"] == {"t": 3.0}
    assert r0["any"] == r1["any"] == (True, False)  # one rank's non-finite loss stops both
    assert r0["bcast"] == r1["bcast"] == {"reason": "from rank 0"}
    assert r0["gather"] == r1["gather"] == [0, 7]
    assert (r0["world"], r1["world"]) == ((0, 2), (1, 2))


def _mismatched(rank):
    try:
        ddp.reduce_sums({"loss": 1.0} if rank == 0 else {"other": 1.0})
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_ranks_reducing_different_metrics_fail_loudly():
    r0, r1 = run_ranks(_mismatched)
    assert "ranks reduce different metrics" in r0 and "ranks reduce different metrics" in r1


def test_single_process_helpers_are_identities():
    assert not ddp.is_distributed() and ddp.get_world_size() == 1
    assert ddp.reduce_sums({"a": 2}) == {"a": 2.0} and ddp.any_rank(True) and not ddp.any_rank(False)
    assert ddp.broadcast_object([1]) == [1] and ddp.all_gather_object("x") == ["x"]


# ---------------------------------------------------------------- torchrun runs

def test_a_rank_other_than_0_refuses_an_earlier_runs_folder_by_itself(tmp_path, monkeypatch):
    """Each rank looks at SAVE_FOLDER/NAME itself before any collective, so no rank is left waiting
    for one that stopped. Here rank 1 of 2 without a rendezvous: joining the group would fail."""
    (tmp_path / "w" / "t").mkdir(parents=True)
    (tmp_path / "w" / "t" / "last.pth").write_bytes(b"an earlier run")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(FeatherFaceError, match="already holds checkpoints of an earlier run"):
        train.main(make_args(tmp_path))


def torchrun(script, args, tmp_path, timeout=420, returncode=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), *args]
    # Output to files (a rank left alive must not hold a pipe open); on a hang SIGTERM goes to
    # torchrun, which stops its ranks (each runs in its own session, out of reach of killpg).
    log = tmp_path / f"torchrun_{free_port()}"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    stdout, stderr = Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()
    if hung:
        pytest.fail(f"2-process run hung past {timeout} s: {' '.join(cmd)}\n{stderr[-2000:]}")
    assert proc.returncode == returncode, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


SKEWED = textwrap.dedent('''
    """train_v2.py whose two ranks see opposite loss trends (rank 0 worsens, rank 1 improves)."""
    import json, sys
    from pathlib import Path
    import train_v2
    from utils.training.distillation import DistillationTrainer

    real_init, real_loss = DistillationTrainer.__init__, DistillationTrainer.compute_loss

    def init(self, args, model):
        real_init(self, args, model)
        self.alpha.plateau_patience = 0  # every epoch without a new best shrinks alpha

    def skewed(self, images, targets):
        parts = real_loss(self, images, targets)
        e = self.state.epoch
        f = 100.0 ** e if self.rank == 0 else 100.0 ** -e  # whatever each shard's own loss
        return {k: v * f if k in ("loss", "task") else v for k, v in parts.items()}

    DistillationTrainer.__init__, DistillationTrainer.compute_loss = init, skewed
    args = train_v2.get_args_parser().parse_args(sys.argv[1:])
    state = train_v2.main(args)
    import torch.distributed as dist
    Path(args.save_folder, f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "epochs": [h["epoch"] for h in state.history], "alpha": [h["alpha"] for h in state.history],
        "alpha_next": [h["alpha_next"] for h in state.history], "task": [h["task"] for h in state.history],
        "stop": state.stop_reason}))
''')


@pytest.mark.slow
def test_two_rank_distillation_with_differing_losses_agrees_and_stops_together(tmp_path):
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(teacher, build_model("v1_slim"))
    script = tmp_path / "skewed_train_v2.py"
    script.write_text(SKEWED)
    torchrun(script, [
        "--teacher_model", str(teacher), "--training_dataset", str(SAMPLE), "--image_size", "96",
        "--batch_size", "1", "--epochs", "8", "--device", "cpu", "--num_workers", "0", "--lr", "0",
        "--no_augment", "--mixup_prob", "0", "--cutmix_prob", "0", "--min_epoch", "1",
        "--early_stopping_patience", "2", "--save_folder", str(tmp_path / "w"), "--log_dir", str(tmp_path / "runs"),
        "--name", "kd", "--pretrained_backbone", "none", "--quiet", "--save_interval", "0",
    ], tmp_path)
    r0, r1 = (json.loads((tmp_path / "w" / f"rank{r}.json").read_text()) for r in (0, 1))
    # Each rank alone would decide otherwise: rank 0's loss rises every epoch, rank 1's falls.
    assert r0 == r1, (r0, r1)
    assert r0["epochs"] == [1, 2, 3] and "improvement" in r0["stop"], r0  # patience 2 after epoch 1
    assert r0["alpha_next"][0] == pytest.approx(0.8 - 0.3 / 8)  # epoch 1 is a new best: no plateau
    assert r0["alpha_next"][1] == pytest.approx((0.8 - 0.6 / 8) * 0.9)  # the mean loss rose: plateau
    assert r0["alpha"][1:] == pytest.approx(r0["alpha_next"][:-1])  # the alpha used is the one decided
    blob = load_checkpoint(tmp_path / "w" / "kd" / "last.pth")
    assert blob["run_state"]["stop_reason"] == r0["stop"] and len(blob["rng"]) == 2


def _train_args(tmp_path, name, *extra):
    return ["--model", "v2", "--training_dataset", str(SAMPLE), "--image_size", "96", "--batch_size", "1",
            "--epochs", "2", "--device", "cpu", "--num_workers", "0", "--save_folder", str(tmp_path / "w"),
            "--log_dir", str(tmp_path / "runs"), "--name", name, "--pretrained_backbone", "none", "--quiet",
            "--save_interval", "0", *extra]


@pytest.mark.slow
def test_two_rank_run_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    # v2 has DropBlock: every rank's own RNG state must come back. 3 images over 2 ranks, batch 1:
    # 2 steps per epoch, 4 in all; the interrupted run stops inside epoch 2.
    torchrun(ROOT / "train.py", _train_args(tmp_path, "full"), tmp_path)
    torchrun(ROOT / "train.py", _train_args(tmp_path, "cut", "--max_iters", "3"), tmp_path)
    cut = tmp_path / "w" / "cut" / "last.pth"
    saved = load_checkpoint(cut)
    assert saved["run_state"]["iteration"] == 3 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # per-rank states
    out = torchrun(ROOT / "train.py", _train_args(tmp_path, "cut", "--resume", str(cut)), tmp_path)
    assert "resumed from" in out.stdout
    a = load_checkpoint(tmp_path / "w" / "full" / "last.pth")
    b = load_checkpoint(cut)
    assert a["run_state"]["iteration"] == b["run_state"]["iteration"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    assert [h["loss"] for h in a["run_state"]["history"]][-1] == pytest.approx(
        [h["loss"] for h in b["run_state"]["history"]][-1], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_refuse_an_earlier_runs_folder_together(tmp_path):
    (tmp_path / "w" / "again").mkdir(parents=True)
    (tmp_path / "w" / "again" / "last.pth").write_bytes(b"an earlier run")
    out = torchrun(ROOT / "train.py", _train_args(tmp_path, "again"), tmp_path, timeout=120, returncode=1)
    assert out.stderr.count("already holds checkpoints of an earlier run") == 2, out.stderr[-3000:]
