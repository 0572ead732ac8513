"""Accuracy benchmark: what each training-time budget (train.py --budget) buys on FER-2013. For every
budget it trains the budget's members with train.py, one call per member (a member cut short is
resumed, a finished one is kept), evaluates the finished ones with evaluate.py on validation (the PublicTest
rows; checkpoints, ensemble weights and everything else are chosen there too) without TTA, with flip,
with ten-crop and with ten-crop plus the whole image (a report of the same members, newer than their
checkpoints, is reused), and prints one table line per budget, naming any member still training.

    python benchmarks/accuracy.py --budgets 20min 90min 3h    # train what is missing, evaluate, print the table
    python benchmarks/accuracy.py --skip-training              # the table from the runs already trained
    python benchmarks/accuracy.py --budgets 20min --label ls0 -- --label-smoothing 0   # an ablation line
    python benchmarks/accuracy.py --budgets 10min --seeds 3   # seeds 0, 1, 2: accuracy as mean +- sd

Runs go to --out/<budget>[-<label>]/ (seed s > 0 to its seed<s>/ inside); the table to --out/accuracy.md and accuracy.json. Each train.py
call is timed with the machine's matmul peak (in the precision train.py trains in there) measured just
before it, because the same machine differs in speed from day to day.
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CPU_PRECISION, ROOT, machine, matmul_peak, peak_text

sys.path.insert(0, str(ROOT))
from models import build_model, describe_model  # noqa: E402
from train import BUDGETS, parse_args  # noqa: E402

TABLE_TTAS = ["none", "flip", "tencrop", "tencrop-full"]  # the budget table's columns (evaluate.py --tta)

# Training multiply-adds per image: the forward pass plus a backward pass that costs about two of it
# (gradients for the activations and for the weights; Kaplan et al. 2020, "Scaling laws", section 2.1).
TRAINING_PASSES = 3


def run(command):
    print("$", " ".join(map(str, command)), flush=True)
    subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True)


def budget_members(budget, train_args):
    """The models a budget trains, as train.py resolves them with the extra flags."""
    return parse_args(["--budget", budget, *train_args])[1].models


def read_run(run_dir):
    """A member run's config.json and metrics.csv rows."""
    config = json.loads((run_dir / "config.json").read_text())
    with open(run_dir / "metrics.csv") as file:
        return config, list(csv.DictReader(file))


def finished(run_dir):
    """Whether a member's run went through all its epochs (a run cut short gets --resume)."""
    try:
        config, rows = read_run(run_dir)
        return len(rows) >= config["epochs"]
    except (OSError, KeyError, ValueError):
        return False


def recorded_calls(run_dir):
    """train_member's record of the train.py calls of a member: seconds, peak, resumed, completed."""
    path = run_dir / "calls.json"
    return json.loads(path.read_text()) if path.exists() else []


def seed_folder(root, key, seed):
    """A line's runs for one seed: seed 0's in <key>/ (where runs were before seeds were counted), seed s's in
    <key>/seed<s>/."""
    return root / key if seed == 0 else root / key / f"seed{seed}"


def train_member(name, budget, out, args, seed=0):
    """One train.py call for one member, timed, with the machine's peak measured just before it."""
    run_dir = out / name
    if finished(run_dir):
        return
    resume = ["--resume"] if (run_dir / "last.pt").exists() else []
    peak = {"matmul_peak_gmacs": round(matmul_peak() / 1e9), "matmul_precision": CPU_PRECISION}
    started, completed = time.perf_counter(), False
    try:
        run(["train.py", "--budget", budget, "--models", name, "--data", args.data, "--out", out, *resume,
             *(["--seed", str(seed)] if seed else []), *args.train_args])
        completed = True
    finally:  # an interrupted call is recorded too: its time counts, and the next call resumes it
        calls = recorded_calls(run_dir)
        calls.append({"seconds": time.perf_counter() - started, **peak, "resumed": bool(resume),
                      "completed": completed})
        if run_dir.exists():
            (run_dir / "calls.json").write_text(json.dumps(calls, indent=2))


def recorded_peak(call):
    """(precision, G MAC/s) of a train.py call; calls recorded before the precision was, were all bf16."""
    if "matmul_peak_gmacs" in call:
        return call["matmul_precision"], call["matmul_peak_gmacs"]
    return "bf16", call["bf16_matmul_peak_gmacs"]


def peak_ranges(peaks):
    """'330-334 bf16' (one range per precision) from [(precision, G MAC/s)]; bare numbers are bf16, as
    accuracy.json recorded them before the precision; ? for none."""
    by_precision = {}
    for peak in peaks:
        precision, value = peak if isinstance(peak, (list, tuple)) else ("bf16", peak)
        by_precision.setdefault(precision, []).append(value)
    return "; ".join("-".join(map(str, sorted({min(v), max(v)}))) + f" {precision}"
                     for precision, v in sorted(by_precision.items())) or "?"


def training_image_macs(config):
    """Forward multiply-adds of one training image: the whole image's, as train.py recorded them, or those of
    its --train-size window, measured on the model rebuilt."""
    side = config.get("train_size")
    if not side:
        return config["size"]["macs"]
    return describe_model(build_model(config["model_name"], len(config["classes"])), side)["macs"]


def member_summary(run_dir):
    """Epochs, training minutes, training multiply-adds and train.py commands of one member. The minutes
    are the epochs times the median epoch's seconds, which a few epochs slowed by other work on the machine
    (or a run paused and resumed) leave as they are."""
    config, rows = read_run(run_dir)
    images = sum(float(r["images_per_sec"]) * float(r["seconds"]) for r in rows)
    seconds = [float(r["seconds"]) for r in rows]
    commands = config.get("commands", ["(not recorded: the run predates train.py recording it)"])
    return {"epochs": len(rows), "train_minutes": len(rows) * statistics.median(seconds) / 60,
            "peaks": sorted({recorded_peak(c) for c in recorded_calls(run_dir)}),
            "training_macs": TRAINING_PASSES * training_image_macs(config) * images,
            "commands": list(dict.fromkeys(commands))}  # a run resumed twice the same way: its command once


def reusable_report(path, checkpoints):
    """The evaluation report at `path` if it holds exactly these members and is newer than each, else None."""
    if not path.exists() or any(path.stat().st_mtime <= c.stat().st_mtime for c in checkpoints):
        return None
    report = json.loads(path.read_text())
    return report if set(report["models"]) == {c.parent.name for c in checkpoints} else None


def evaluate_budget(out, members, data):
    """Validation accuracy of each member (finished ones only) and of their ensemble, for each TTA mode."""
    checkpoints = [out / name / "best.pt" for name in members]
    accuracy = {}
    for tta in TABLE_TTAS:
        folder = out / f"evaluation_{tta}"
        report = reusable_report(folder / "report.json", checkpoints)
        if report is None:
            run(["evaluate.py", "--checkpoints", *checkpoints, "--data", data, "--split", "val", "--tta", tta,
                 "--out", folder, "--refit"])
            report = json.loads((folder / "report.json").read_text())
        for name, figures in [*report["models"].items(), ("ensemble", report.get("ensemble"))]:
            if figures:
                accuracy.setdefault(name, {})[tta] = figures["accuracy"]
    return accuracy


def summarize(out, accuracy):
    members = {name: member_summary(out / name) for name in accuracy if (out / name / "config.json").exists()}
    return {"members": members, "accuracy": accuracy,
            "train_minutes": sum(m["train_minutes"] for m in members.values()),
            "peaks": sorted({tuple(p) for m in members.values() for p in m["peaks"]}),
            "training_macs": sum(m["training_macs"] for m in members.values())}


def combine_seeds(summaries):
    """One table line from the summaries of several seeds: each accuracy the list of the seeds' (the table
    shows mean +- standard deviation), minutes and multiply-adds their mean, every seed's commands."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    accuracy = {name: {tta: [s["accuracy"][name][tta] for s in summaries] for tta in figures
                       if all(tta in s["accuracy"].get(name, {}) for s in summaries)}
                for name, figures in first["accuracy"].items()}
    members = {name: {**member, "commands": [c for s in summaries for c in s["members"][name]["commands"]]}
               for name, member in first["members"].items()}
    return {"members": members, "accuracy": accuracy, "seeds": len(summaries),
            "train_minutes": statistics.mean(s["train_minutes"] for s in summaries),
            "peaks": sorted({tuple(p) for s in summaries for p in s["peaks"]}),
            "training_macs": statistics.mean(s["training_macs"] for s in summaries)}


def accuracy_text(value):
    """'66.29%' for one run, '67.10 +- 0.40%' (mean +- standard deviation) for a list of seeds' accuracies."""
    if isinstance(value, list):
        return f"{100 * statistics.mean(value):.2f} ± {100 * statistics.stdev(value):.2f}%"
    return f"{100 * value:.2f}%"


def earlier_results(path, data):
    """The budget lines of an earlier call on the same data, kept so that measuring one budget leaves the others
    in the table."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return earlier.get("budgets", {}) if earlier.get("data") == data else {}


def line_order(key):
    """Table order: budgets as train.py lists them, each followed by its labelled ablations."""
    budget, _, label = key.partition("-")
    return list(BUDGETS).index(budget), label


def markdown_table(results, data):
    lines = [f"FER-2013 validation (PublicTest), `--data {data}`", "",
             "| budget | members (epochs) | train min | matmul peak, G MAC/s | training multiply-adds | val acc | "
             "flip TTA | ten-crop TTA | ten-crop + whole TTA |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        members = ", ".join(f"{name} ({m['epochs']})" for name, m in r["members"].items())
        unfinished = [name for name in r.get("members_planned", []) if name not in r["members"]]
        members += f"; still training: {', '.join(unfinished)}" if unfinished else ""
        members += f"; {r['seeds']} seeds" if r.get("seeds", 1) > 1 else ""
        peaks = peak_ranges(r["peaks"])
        ensemble = r["accuracy"]["ensemble" if "ensemble" in r["accuracy"] else next(iter(r["members"]))]
        lines.append(f"| {key} | {members} | {r['train_minutes']:.0f} | {peaks} | {r['training_macs'] / 1e15:.2f} P | "
                     + " | ".join(accuracy_text(ensemble[tta]) if tta in ensemble else "?" for tta in TABLE_TTAS)
                     + " |")
    lines += ["", "train min: each member's epochs times its median epoch's seconds (validation passes not "
              "included), added up; matmul peak: the machine's matmul multiply-adds per second in the precision "
              "train.py trained in (bf16 where the CPU has native bf16 kernels, else fp32), measured before "
              "each train.py call (? where the run predates this benchmark); training multiply-adds: "
              f"{TRAINING_PASSES} x forward multiply-adds x training images seen (both the mean over seeds where "
              "there are several). Accuracy: the ensemble of the members (the member itself for one), its "
              "weights fitted on validation; mean ± standard deviation over seeds where there are several.",
              "", "Commands:"]
    for key, r in results.items():
        commands = [c for m in r["members"].values() for c in m["commands"]]
        lines.append(f"- {key}: " + "; ".join(f"`{c}`" for c in commands)
                     + f"; then `python evaluate.py --runs RUNS --data {data} --split val --tta TTA --refit`")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"),
                        help="FER-2013 folder with train/ and val/")
    parser.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS),
                        help="budgets to train and evaluate, in order")
    parser.add_argument("--label", default="", help="suffix of the run folders, for an ablation with extra flags")
    parser.add_argument("--out", default="runs/budgets", help="folder for the runs, reports and the table")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train and evaluate seeds 0 to N-1 of each budget; the table gives mean ± sd")
    parser.add_argument("--skip-training", action="store_true", help="evaluate only the runs already trained")
    parser.add_argument("train_args", nargs="*",
                        help="extra train.py flags, after --, e.g. -- --label-smoothing 0")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"error: {args.data} is not a folder; pass --data with FER-2013's train/ and val/ folders")
    root = (ROOT / args.out).resolve()
    results = {}
    for budget in args.budgets:
        key = f"{budget}-{args.label}" if args.label else budget
        members = budget_members(budget, args.train_args)
        summaries = []
        for seed in range(args.seeds):
            out = seed_folder(root, key, seed)
            for name in [] if args.skip_training else members:
                train_member(name, budget, out, args, seed)
            done = [name for name in members if finished(out / name)]
            if done and (seed == 0 or done == members):  # a seed counts once all its members are trained
                summaries.append(summarize(out, evaluate_budget(out, done, args.data)))
        if summaries:
            results[key] = combine_seeds(summaries)
            results[key]["members_planned"] = members
    results = {**earlier_results(root / "accuracy.json", args.data), **results}
    results = dict(sorted(results.items(), key=lambda item: line_order(item[0])))
    m = machine()
    table = markdown_table(results, args.data)
    print(f"\n{table}\n\nevaluated on {m['processor']}, {m['usable_cpus']} CPU cores, torch {m['torch']}, "
          f"{peak_text(m)} now")
    (root / "accuracy.json").write_text(json.dumps({"budgets": results, "machine": m, "data": args.data}, indent=2))
    (root / "accuracy.md").write_text(table + "\n")
    print(f"wrote {root}/accuracy.json and accuracy.md")


if __name__ == "__main__":
    main()
