"""A training run's history, written after every epoch: metrics.csv (one row per epoch) and curves.png
(loss and accuracy against epochs, for training and validation)."""
import csv
import io

import matplotlib

from ferkit.files import write_atomic, write_text_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_sec"]


def write_metrics(run_dir, metrics):
    text = io.StringIO()
    # A run resumed from an older checkpoint may have rows with columns no longer written: they are left out.
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    write_text_atomic(run_dir / "metrics.csv", text.getvalue())


def plot_curves(run_dir, metrics, title):
    epochs = [m["epoch"] for m in metrics]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [m[f"{split}_loss"] for m in metrics], marker=".", label=split)
        acc_axis.plot(epochs, [100 * m[f"{split}_acc"] for m in metrics], marker=".", label=split)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    write_atomic(run_dir / "curves.png", lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)
