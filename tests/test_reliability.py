"""Bad input gives a clear error or a counted skip; an interrupted run loses nothing; a checkpoint
never runs code. Each case asserts the exact outcome."""
import csv
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK_TRAINING, ROOT, write_class_tree, write_image
from PIL import Image

from ferkit import cli
import data
import evaluate
from ferkit import files
import train

TINY = ["--data", "synthetic:5", *QUICK_TRAINING]


def bad_file_tree(root):
    """One class folder of good images, one of every kind of bad or odd file."""
    write_class_tree(root, ["happy"], per_class=2)
    odd = root / "sad"
    odd.mkdir()
    good = (odd / "good.jpg")
    write_image(good, mode="RGB")
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (odd / "text.jpg").write_text("just text")
    write_image(odd / "alpha.png", mode="RGBA")
    Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)).save(odd / "sixteen_bit.png")
    write_image(odd / "one_pixel.png", size=(1, 1))
    write_image(odd / "huge.jpg", size=(5000, 5000))
    Image.new("1", (20000, 20000)).save(odd / "bomb.png")  # 400 M pixels in a few kB
    os.symlink(odd / "loop_a.jpg", odd / "loop_b.jpg")
    os.symlink(odd / "loop_b.jpg", odd / "loop_a.jpg")
    return root


BAD_FILES = ["zero.jpg", "truncated.jpg", "text.jpg", "bomb.png", "loop_a.jpg", "loop_b.jpg"]
ODD_BUT_GOOD = ["good.jpg", "alpha.png", "sixteen_bit.png", "one_pixel.png", "huge.jpg"]


def test_bad_files_are_skipped_counted_and_named(tmp_path, capsys):
    split = data.load_split(bad_file_tree(tmp_path / "d"), "train")
    output = capsys.readouterr().out
    assert len(split.labels) == 2 + len(ODD_BUT_GOOD)
    assert f"skipped {len(BAD_FILES)} unreadable file(s)" in output
    for name in BAD_FILES:
        assert name in output, name
    assert "decompression bomb" in output
    sixteen_bit = sorted(p.name for p in (tmp_path / "d" / "sad").iterdir() if p.name in ODD_BUT_GOOD).index(
        "sixteen_bit.png")
    assert int(split.images[split.labels == 1][sixteen_bit].min()) == 255  # scaled, not clipped to garbage


def test_unreadable_permission_is_skipped(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    root = write_class_tree(tmp_path / "d", ["happy"], per_class=2)
    (root / "happy" / "0.png").chmod(0)
    assert len(data.load_split(root, "train").labels) == 1
    assert "0.png" in capsys.readouterr().out


def train_error(tmp_path, *argv, error=cli.UsageError):
    """The message of the `error` train.main raises (cli.run reports it as "error: <message>")."""
    with pytest.raises(error) as raised:
        train.main(["--out", str(tmp_path / "runs"), "--epochs", "1", *argv])
    return str(raised.value)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: write_image(p / "a.png"), "is a file but not a .csv"),
    (lambda p: write_image(p / "flat" / "a.png").parent, "has no class folders"),
    (lambda p: (p / "d" / "happy").mkdir(parents=True) or p / "d", "no class folder under"),
    (lambda p: ((p / "d" / "sad").mkdir(parents=True), (p / "d" / "sad" / "x.jpg").write_text("no"))
     and p / "d", "none of the 1 files"),
    (lambda p: (p / "f.csv").write_text("emotion,pixels\n1,2\n") and p / "f.csv", "missing column"),
])
def test_bad_data_is_a_clear_error_from_train(tmp_path, make, message):
    assert message in train_error(tmp_path, "--data", str(make(tmp_path)), error=data.DataError)


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet"], "invalid choice: 'resnet'"),
    (["--epochs", "0"], "must be greater than 0"),
    (["--epochs", "-3"], "must be greater than 0"),
    (["--batch-size", "0"], "must be greater than 0"),
    (["--lr", "-0.1"], "must be greater than 0"),
    (["--lr", "0"], "must be greater than 0"),
    (["--label-smoothing", "1.5"], "must be between 0 and 1"),
    (["--budget", "1h"], "invalid choice: '1h'"),
])
def test_bad_flags_are_rejected_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "runs"), "--data", "synthetic:5", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_errors(tmp_path):
    message = train_error(tmp_path, *TINY, "--resume")
    assert "--resume: no" in message and "Start the run without --resume" in message
    train.main(["--out", str(tmp_path / "runs"), "--epochs", "1", "--models", "model_y", *TINY])
    (tmp_path / "runs" / "model_x").mkdir()
    os.link(tmp_path / "runs" / "model_y" / "last.pt", tmp_path / "runs" / "model_x" / "last.pt")
    assert "is a model_y run" in train_error(tmp_path, *TINY, "--resume", "--models", "model_x")
    six = write_class_tree(tmp_path / "six", ["angry", "fear", "happy", "neutral", "sad", "surprise"], 6)
    assert "on classes" in train_error(tmp_path, "--data", str(six), "--resume", "--models", "model_y")
    assert "--schedule cosine; it cannot switch to plateau" in train_error(
        tmp_path, *TINY, "--resume", "--models", "model_y", "--schedule", "plateau")


def test_data_whose_classes_no_checkpoint_knows(trained_runs, tmp_path):
    other = write_class_tree(tmp_path / "other", ["cat", "dog"], per_class=2)
    with pytest.raises(cli.UsageError, match="none of the data's classes \\(cat, dog\\) is known"):
        evaluate.main(["--runs", str(trained_runs), "--data", str(other), "--split", "test",
                       "--out", str(tmp_path / "eval")])


def test_evaluating_untrusted_images_skips_bad_files_and_writes_only_into_out(trained_runs, tmp_path):
    root = tmp_path / "untrusted"
    bad_file_tree(root / "test")
    before = set(tmp_path.rglob("*"))
    report = evaluate.main(["--checkpoints", str(trained_runs / "model_x" / "best.pt"), "--data", str(root),
                            "--out", str(tmp_path / "eval"), "--tta", "none"])
    assert sum(map(sum, report["models"]["model_x"]["confusion_matrix"])) == 2 + len(ODD_BUT_GOOD)
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert written and all(p.is_relative_to(tmp_path / "eval") for p in written)


def test_safe_filename_never_makes_a_path():
    for name in ["../../etc/passwd", "/abs/path", "..", "a\\b", "x\x00y", ""]:
        cleaned = files.safe_filename(name)
        assert "/" not in cleaned and "\\" not in cleaned and not cleaned.startswith(".") and cleaned


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/fer-checkpoint-ran-code")


def test_a_checkpoint_that_runs_code_on_load_is_refused(tmp_path, trained_runs):
    MARKER.unlink(missing_ok=True)
    evil = tmp_path / "model_x" / "best.pt"
    evil.parent.mkdir()
    checkpoint = torch.load(trained_runs / "model_x" / "best.pt", weights_only=True)
    checkpoint["config"] = RunsCode()
    torch.save(checkpoint, evil)  # torch.save pickles: the object would run os.system when unpickled
    with open(tmp_path / "plain.pkl", "wb") as file:
        pickle.dump(RunsCode(), file)
    with pytest.raises(cli.UsageError, match=f"cannot use checkpoint {evil}"):
        evaluate.main(["--checkpoints", str(evil), "--out", str(tmp_path / "eval")])
    (tmp_path / "model_x" / "last.pt").write_bytes(evil.read_bytes())
    assert "cannot load checkpoint" in train_error(tmp_path, *TINY, "--resume", "--out", str(tmp_path))
    assert not MARKER.exists()


def test_unwritable_output_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("x")
    message = train_error(tmp_path, *TINY, "--out", str(tmp_path / "a_file" / "runs"))
    assert "cannot write to" in message and "Choose another --out" in message


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert "MB free; a run needs about" in train_error(tmp_path, *TINY)
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = ["--out", str(tmp_path / "runs"), "--models", "model_x", *TINY]
    train.main([*out, "--epochs", "1"])
    good = torch.load(tmp_path / "runs" / "model_x" / "last.pt", weights_only=True)["model"]
    with pytest.raises(cli.UsageError, match=r"loss became (nan|inf) at epoch \d+, batch \d+.*try --lr"):
        train.main([*out, "--epochs", "5", "--resume", "--lr", "1e12", "--precision", "fp32"])
    kept = torch.load(tmp_path / "runs" / "model_x" / "last.pt", weights_only=True)
    assert kept["progress"]["epoch"] == 1
    assert all(torch.equal(good[k], kept["model"][k]) for k in good)


def test_corrupt_cache_with_valid_zip_is_detected(tmp_path, capsys):
    root = write_class_tree(tmp_path / "d", ["happy", "sad"])
    first = data.load_split(root, "train", cache_dir=tmp_path / "cache")
    path = next((tmp_path / "cache").glob("*.npz"))
    with np.load(path) as cached:
        arrays = dict(cached)
    arrays["images"][0, 0, 0] ^= 1
    np.savez(path, **arrays)
    assert torch.equal(data.load_split(root, "train", cache_dir=tmp_path / "cache").images, first.images)
    assert "checksum mismatch" in capsys.readouterr().out


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, capsys):
    root = write_class_tree(tmp_path / "d", ["happy", "sad"])
    first = data.load_split(root, "train", cache_dir=tmp_path / "cache")
    path = next((tmp_path / "cache").glob("*.npz"))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert torch.equal(data.load_split(root, "train", cache_dir=tmp_path / "cache").images, first.images)
    assert f"cache file {path} is corrupt" in capsys.readouterr().out
    assert data.read_cache(path) is not None  # rebuilt whole


def start_training(out, resume, epochs):
    """train.py in a subprocess, returned once it has loaded its data (its first output line)."""
    command = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--epochs", str(epochs),
               "--threads", "1", "--models", "model_y", *TINY, *(["--resume"] if resume else [])]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "FER_CACHE_DIR": str(out / "cache"), "PYTHONUNBUFFERED": "1"})
    process.stdout.readline()
    return process


def modified_ns(path):
    return path.stat().st_mtime_ns if path.exists() else 0


def wait_for_a_new_checkpoint(path, since_ns, process, timeout=120):
    """Seconds until `path` is rewritten (train.py replaces last.pt after every epoch) or `process` ends."""
    started = time.monotonic()
    while modified_ns(path) <= since_ns and process.poll() is None and time.monotonic() - started < timeout:
        time.sleep(0.02)
    return time.monotonic() - started


KILLS = 6  # each costs a train.py start-up: the suite's slowest test


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """KILLS kills at random instants of training, each followed by a check that last.pt loads; then --resume
    finishes the run with every epoch recorded once. Each process first completes one epoch and is then
    killed within about one more (tiny epochs, so many kills land while checkpoints are written): timed in
    epochs, not seconds, so that the run advances on a slow machine and does not finish on a fast one."""
    rng, out, epochs = random.Random(0), tmp_path / "runs", 80
    run_dir, kills, killed_mid_write = out / "model_y", 0, 0
    last = run_dir / "last.pt"
    while kills < KILLS:
        before = modified_ns(last)
        process = start_training(out, resume=last.exists(), epochs=epochs)
        first_epoch = wait_for_a_new_checkpoint(last, before, process)
        time.sleep(rng.uniform(0.0, first_epoch))
        if process.poll() is not None:
            break  # the run finished before this kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        kills += 1
        killed_mid_write += bool(list(run_dir.glob(".*.tmp")))
        torch.load(last, weights_only=True)
    assert kills == KILLS, f"the run finished after {kills} kills"
    done = torch.load(last, weights_only=True)["progress"]["epoch"]
    assert KILLS <= done < epochs
    finish = start_training(out, resume=True, epochs=done + 2)  # two more epochs finish it, on any machine
    output, _ = finish.communicate(timeout=600)
    assert finish.returncode == 0, output
    assert not list(run_dir.glob(".*.tmp"))
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["progress"]["best_val_acc"] >= 0
    assert torch.load(last, weights_only=True)["progress"]["epoch"] == done + 2
    with open(run_dir / "metrics.csv") as file:
        assert [int(r["epoch"]) for r in csv.DictReader(file)] == list(range(1, done + 3))
    print(f"{kills} kills after epoch {done}, {killed_mid_write} while a file was being written")


def test_ctrl_c_saves_current_state_and_says_how_to_resume(tmp_path):
    out = tmp_path / "runs"
    process = start_training(out, resume=False, epochs=200)
    deadline = time.time() + 60
    while not (out / "model_y" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "interrupted at epoch" in output and "python train.py --resume" in output
    progress = torch.load(out / "model_y" / "last.pt", weights_only=True)["progress"]
    assert 1 <= progress["epoch"] < 200
