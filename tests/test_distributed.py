"""train.py under torchrun: two CPU processes (gloo) against one, checkpoints, resume with another
process count, stopping and failing processes, and the errors for settings processes cannot share."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import QUICK_TRAINING, ROOT

from ferkit import cli
import data
from ferkit import distributed
from ferkit import inference
from ferkit.checkpoint import load_checkpoint, model_from_checkpoint, restore_rank_rng, rng_state
import train

EPOCHS = 3
# synthetic:40 is 280 training images (8 batches of 32 and one of 24, split 12 + 12) and 56 validation
# images; fp32, so the validation images give the same sums however they are split among processes.
RECIPE = ["--data", "synthetic:40", "--models", "model_y", "--threads", "1", "--precision", "fp32",
          *QUICK_TRAINING, "--lr", "0.02"]
# A 2-process run against a 1-process run of the same recipe (same seed, initial weights and global
# batches) differs only in random draws (each process flips and drops out its own way) and in batch norm
# normalizing each half of a batch apart (--sync-bn, which would remove that, needs GPUs): close, not equal.
# The tolerances are a few times the largest gaps seen between the two on synthetic recipes of this size;
# the exact math (the parts' weighted gradients make the whole batch's) is checked without noise further down.
LOSS_TOLERANCE = 0.05
ACCURACY_TOLERANCE = 0.10


def environment(**extra):
    env = {key: value for key, value in os.environ.items()
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FER_CACHE_DIR": str(extra.pop("cache")),
            **extra}


def rows(run_dir):
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """model_y trained by torchrun with two CPU processes."""
    out = tmp_path_factory.mktemp("two")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *RECIPE, "--epochs", str(EPOCHS), "--out", str(out)]
    finished = subprocess.run(command, cwd=ROOT, env=environment(cache=out / "cache"), capture_output=True,
                              text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return out / "model_y", finished.stdout


def test_two_process_run_writes_one_run_that_loads_in_one_process(two_process_run):
    run_dir, output = two_process_run
    assert [int(r["epoch"]) for r in rows(run_dir)] == list(range(1, EPOCHS + 1))  # each epoch once
    assert output.count(f"epoch {EPOCHS}/{EPOCHS}:") == 1 and output.count("data: ") == 1  # rank 0 alone prints
    last = load_checkpoint(run_dir / "last.pt")
    assert not [key for key in last["model"] if key.startswith("module.")]
    assert len(last["rank_rng"]) == 1 and last["config"]["batch_size"] == 32  # rank 1's generators; global batch
    assert json.loads((run_dir / "config.json").read_text())["processes"] == 2
    member = inference.load_member(run_dir / "best.pt")
    assert member.model(torch.rand(2, 1, 48, 48)).shape == (2, 7)
    assert not list(run_dir.glob(".*.tmp"))


def test_validation_counts_every_image_once(two_process_run):
    """Each process validates its half and the sums are added: the saved model, validated by one
    process on the whole split, scores what the 2-process run recorded."""
    run_dir, _ = two_process_run
    _, val = data.load_train_val("synthetic:40")
    model = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"))
    loss, accuracy = train.evaluate_split(model, val.images, val.labels, torch.device("cpu"), "fp32", True, 32)
    recorded = rows(run_dir)[-1]
    assert loss == pytest.approx(float(recorded["val_loss"]), abs=2e-5)
    assert accuracy == pytest.approx(float(recorded["val_acc"]), abs=1e-5)


def test_two_processes_and_one_train_the_same_recipe(two_process_run, tmp_path):
    two, _ = two_process_run
    train.main([*RECIPE, "--epochs", str(EPOCHS), "--out", str(tmp_path)])
    one = rows(tmp_path / "model_y")
    two = rows(two)
    for key in ("train_loss", "val_loss"):
        assert abs(float(one[0][key]) - float(two[0][key])) < LOSS_TOLERANCE, (key, one[0], two[0])
    assert abs(float(one[-1]["val_acc"]) - float(two[-1]["val_acc"])) <= ACCURACY_TOLERANCE, (one[-1], two[-1])
    assert [r["lr"] for r in one] == [r["lr"] for r in two]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_by_hand(out, *argv, world=2):
    """train.py started once per rank with the variables torchrun sets, but no torchrun watching over
    them: what the remaining processes do when one fails is theirs alone. Returns once rank 0 has
    finished its first epoch."""
    port, processes = free_port(), []
    for rank in range(world):
        env = environment(cache=out / "cache", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen(
            [sys.executable, "train.py", "--data", "synthetic:10", "--models", "model_y", "--out", str(out),
             "--epochs", "200", *QUICK_TRAINING, "--batch-size", "16", *argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 120
    while "epoch 1/200:" not in processes[0].stdout.readline():
        assert processes[0].poll() is None and time.time() < deadline, "rank 0 did not train"
    return processes


def finish(process, timeout):
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def test_sigterm_on_one_rank_stops_every_rank_saves_once_and_one_process_resumes(tmp_path):
    processes = launch_by_hand(tmp_path)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [finish(process, timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [130, 130], outputs
    assert outputs[0].count("interrupted at epoch") == 1 and "interrupted" not in outputs[1]
    saved = load_checkpoint(tmp_path / "model_y" / "last.pt")
    progress = saved["progress"]
    assert 1 <= progress["epoch"] < 200 and len(saved["rank_rng"]) == 1
    # The interrupted 2-process run (mid-epoch, most likely), finished by one process.
    train.main(["--resume", "--out", str(tmp_path), "--models", "model_y", "--threads", "1",
                "--epochs", str(progress["epoch"] + 1)])
    assert [int(r["epoch"]) for r in rows(tmp_path / "model_y")] == list(range(1, progress["epoch"] + 2))
    last = load_checkpoint(tmp_path / "model_y" / "last.pt")
    assert last["progress"]["epoch"] == progress["epoch"] + 1 and last["rank_rng"] == []


def test_a_killed_rank_makes_the_others_fail_not_hang(tmp_path):
    processes = launch_by_hand(tmp_path, "--dist-timeout", "10")
    processes[1].send_signal(signal.SIGKILL)
    processes[1].communicate()
    started = time.time()
    output = finish(processes[0], timeout=60)  # gloo sees the connection close; at worst, --dist-timeout
    assert processes[0].returncode == 1 and time.time() - started < 60
    assert "Traceback" in output and "epoch 200/200" not in output, output[-2000:]


def test_a_hung_rank_makes_the_others_fail_after_the_timeout(launched_as):
    """A process that stops answering (here: one that joins and then sleeps) fails the others'
    next collective after --dist-timeout, instead of hanging them."""
    launched_as(0, world=2)
    peer = subprocess.Popen(
        [sys.executable, "-c", "import time, torch.distributed as d; print('ready', flush=True); "
         "d.init_process_group('gloo'); time.sleep(120)"],
        env={**os.environ, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline() == "ready\n"  # joins as soon as rank 0 is there, within the 3 s
        distributed.setup(torch.device("cpu"), timeout_s=3)
        started = time.time()
        with pytest.raises(RuntimeError, match="[Tt]imed out"):
            distributed.all_reduce_sum(torch.ones(1))
        assert time.time() - started < 20
    finally:
        distributed.teardown()
        peer.kill()
        peer.communicate()


@pytest.fixture
def launched_as(monkeypatch):
    """Set the variables torchrun gives a process (for errors raised before or while joining)."""
    def set_rank(rank, world=2, port=None):
        for key, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port or free_port()}.items():
            monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # setup() sets it; restored afterwards
    return set_rank


@pytest.mark.parametrize("rank", [0, 1])
def test_a_batch_size_the_processes_cannot_share_is_refused_before_any_work(tmp_path, launched_as, rank):
    launched_as(rank, world=2)
    with pytest.raises(cli.UsageError, match=r"--batch-size 33 does not divide among 2 processes.*--batch-size 34"):
        train.main(["--data", "synthetic:5", "--out", str(tmp_path / "runs"), "--batch-size", "33"])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(cli.UsageError, match="--sync-bn needs CUDA GPUs"):
        train.main(["--data", "synthetic:5", "--out", str(tmp_path / "runs"), "--sync-bn", "--device", "cpu"])
    # synthetic:10 is 70 training images: a last batch of 6 does not give each of 4 processes two.
    launched_as(rank, world=4)
    with pytest.raises(cli.UsageError, match="last batch of each epoch holds 6 of the 70 training images"):
        distributed.check_launch(32, False, torch.device("cpu"), train_images=70)


def test_a_port_in_use_or_a_missing_rendezvous_is_explained(tmp_path, launched_as):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        launched_as(0, port=taken.getsockname()[1])
        with pytest.raises(cli.UsageError, match=r"cannot join the process group as rank 0 of 2: port \d+ is in use"):
            train.main(["--data", "synthetic:5", "--out", str(tmp_path), "--dist-timeout", "3"])
    launched_as(1)  # rank 0 never comes
    started = time.time()
    with pytest.raises(cli.UsageError, match=r"no rendezvous with the other processes at 127.0.0.1:\d+ within 2 s"):
        train.main(["--data", "synthetic:5", "--out", str(tmp_path), "--dist-timeout", "2"])
    assert time.time() - started < 30


def test_weighted_parts_of_a_batch_give_the_whole_batch_gradient(monkeypatch):
    """What DDP averages over the processes (each process's gradient, its loss weighted by its share
    of the batch) is the gradient one process takes on the whole batch, uneven last batches included."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def gradient(part_x, part_y, batch_images):
        copy = torch.nn.Linear(6, 3)
        copy.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(copy.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train.train_step(copy, optimizer, scaler, part_x, part_y, torch.device("cpu"), "fp32", 0.1, batch_images)
        return torch.cat([p.grad.flatten() for p in copy.parameters()])

    whole = gradient(x, y, 5)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = [gradient(part_x, part_y, 5) for part_x, part_y in zip(x.tensor_split(2), y.tensor_split(2))]
    assert torch.allclose((parts[0] + parts[1]) / 2, whole, atol=1e-6)


def test_each_rank_draws_its_own_random_numbers_reproducibly():
    assert distributed.rank_seed(7, 0) == 7  # one process draws what plain `python train.py` draws
    seeds = {distributed.rank_seed(7, rank) for rank in range(8)}
    assert len(seeds) == 8 and distributed.rank_seed(7, 3) == distributed.rank_seed(7, 3)
    assert distributed.rank_seed(8, 1) != distributed.rank_seed(7, 1)
    # A rank the saved run did not have: a fresh stream from (seed, rank, epoch, batch), the same every time.
    checkpoint = {"rng": rng_state(torch.device("cpu"), torch.Generator()), "rank_rng": [],
                  "progress": {"epoch": 3, "batch": 2}}
    draws = []
    for _ in range(2):
        generator = torch.Generator()
        restore_rank_rng(checkpoint, 1, 7, torch.device("cpu"), generator)
        draws.append(torch.rand(3, generator=generator))
    assert torch.equal(*draws)
