"""benchmarks/accuracy.py's bookkeeping: a budget's members, minutes, multiply-adds and table line,
on tiny trained runs (the benchmark itself trains for hours and is never run by a test); and
benchmarks/ensemble_pool.py's scoring of combinations."""
import argparse
import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402  (after the benchmarks folder is on the path)
import ensemble_pool  # noqa: E402


def test_a_budget_resolves_to_the_members_train_py_would_train():
    assert accuracy.budget_members("20min", []) == ["model_y"]
    assert accuracy.budget_members("3h", ["--models", "model_x"]) == ["model_x"]


def test_accuracy_parser_passes_the_flags_after_dashes_to_train_py():
    args = accuracy.build_parser().parse_args(["--budgets", "20min", "--label", "ls0", "--", "--label-smoothing", "0"])
    assert (args.budgets, args.label, args.train_args) == (["20min"], "ls0", ["--label-smoothing", "0"])
    assert accuracy.budget_members("20min", args.train_args) == ["model_y"]  # train.py accepts those flags


def test_summary_and_table_of_a_trained_budget(trained_runs):
    config = json.loads((trained_runs / "model_x" / "config.json").read_text())
    figures = {"none": 0.5, "flip": 0.55, "tencrop": 0.6, "tencrop-full": 0.62}
    result = accuracy.summarize(trained_runs, {"model_x": figures, "model_y": figures, "ensemble": figures})
    member = result["members"]["model_x"]
    images = 20 * 7  # synthetic:20 has 20 training images per class, one epoch
    assert member["epochs"] == 1 and accuracy.finished(trained_runs / "model_x")
    assert member["training_macs"] == pytest.approx(3 * config["size"]["macs"] * images, rel=0.01)
    assert result["training_macs"] == pytest.approx(sum(m["training_macs"] for m in result["members"].values()))
    result["members_planned"] = ["model_x", "model_y", "model_z"]
    table = accuracy.markdown_table({"20min": result}, "DATA")
    line = next(row for row in table.splitlines() if row.startswith("| 20min |"))
    assert "model_x (1), model_y (1); still training: model_z" in line
    assert line.endswith("| 50.00% | 55.00% | 60.00% | 62.00% |")
    assert config["commands"][0] in table  # the command that trained each member
    del figures["tencrop-full"]  # a line measured before that TTA mode existed
    line = next(row for row in accuracy.markdown_table({"20min": result}, "DATA").splitlines() if "| 20min |" in row)
    assert line.endswith("| 60.00% | ? |")


def test_seeds_make_one_line_of_mean_and_spread():
    def summary(accuracy, minutes, peak):
        member = {"epochs": 15, "train_minutes": minutes, "peaks": [peak], "training_macs": 1e14,
                  "commands": [f"python train.py --seed {minutes}"]}
        return {"members": {"model_a": member}, "accuracy": {"model_a": {"none": accuracy, "flip": accuracy}},
                "train_minutes": minutes, "peaks": [peak], "training_macs": 1e14}
    line = accuracy.combine_seeds([summary(0.66, 9, ("bf16", 900)), summary(0.68, 11, ("bf16", 910)),
                                   summary(0.67, 10, ("bf16", 905))])
    assert line["seeds"] == 3 and line["train_minutes"] == 10 and line["accuracy"]["model_a"]["none"] == [0.66, 0.68, 0.67]
    assert len(line["members"]["model_a"]["commands"]) == 3  # every seed's command
    row = next(r for r in accuracy.markdown_table({"10min": line}, "DATA").splitlines() if r.startswith("| 10min |"))
    assert "model_a (15); 3 seeds | 10 | 900-910 bf16 |" in row and "| 67.00 ± 1.00% | 67.00 ± 1.00% | ? | ? |" in row
    assert accuracy.combine_seeds([summary(0.66, 9, ("bf16", 900))])["accuracy"]["model_a"]["none"] == 0.66


def test_seed_zero_keeps_the_folder_runs_had_before_seeds(tmp_path):
    assert accuracy.seed_folder(tmp_path, "10min", 0) == tmp_path / "10min"
    assert accuracy.seed_folder(tmp_path, "10min", 2) == tmp_path / "10min" / "seed2"


def test_peaks_are_shown_per_precision_and_old_records_count_as_bf16():
    old_call, new_call = {"bf16_matmul_peak_gmacs": 330}, {"matmul_peak_gmacs": 41, "matmul_precision": "fp32"}
    assert accuracy.recorded_peak(old_call) == ("bf16", 330) and accuracy.recorded_peak(new_call) == ("fp32", 41)
    assert accuracy.peak_ranges([("bf16", 334), ("bf16", 330)]) == "330-334 bf16"
    assert accuracy.peak_ranges([330, ["fp32", 41], ["fp32", 41]]) == "330 bf16; 41 fp32"  # as accuracy.json holds them
    assert accuracy.peak_ranges([]) == "?"


def test_lines_measured_earlier_on_the_same_data_stay_in_the_table(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"data": "DATA", "budgets": {"20min": {"train_minutes": 19}}}))
    assert accuracy.earlier_results(path, "DATA") == {"20min": {"train_minutes": 19}}
    assert accuracy.earlier_results(path, "OTHER DATA") == {}
    assert accuracy.earlier_results(tmp_path / "missing.json", "DATA") == {}


def test_table_lines_follow_the_budgets_each_with_its_ablations():
    keys = ["3h-z80", "20min-z24", "3h", "20min", "90min"]
    assert sorted(keys, key=accuracy.line_order) == ["20min", "20min-z24", "90min", "3h", "3h-z80"]


def test_pool_scores_both_means_with_equal_weights():
    # One image of class 1: member a is sure it is class 0, member b rules class 0 out. The mean of probabilities
    # follows a's confidence; the mean of log-probabilities lets b's veto win.
    a, b = np.array([[0.9, 0.1, 0.0]]), np.array([[0.001, 0.5, 0.499]])
    scores = ensemble_pool.score_combination([a, b], np.array([1]))
    assert scores == {"members_mean": 50.0, "any_member_right": 100.0, "members_disagree": 100.0,
                      "probability_mean": 0.0, "log_probability_mean": 100.0}


def test_pool_counts_where_the_members_differ_and_where_any_is_right():
    # Labels 0, 1, 2: both members right on the first image, both wrong alike on the second, split on the third.
    a = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    b = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    scores = ensemble_pool.score_combination([a, b], np.array([0, 1, 2]))
    assert scores["any_member_right"] == pytest.approx(200 / 3)
    assert scores["members_disagree"] == pytest.approx(100 / 3)


def test_pool_members_are_named_checkpoints():
    assert ensemble_pool.named_path("x=runs/a/best.pt") == ("x", "runs/a/best.pt")
    for bad in ["runs/a/best.pt", "=runs/a/best.pt", "x="]:
        with pytest.raises(argparse.ArgumentTypeError):
            ensemble_pool.named_path(bad)


def test_each_benchmark_script_exposes_its_parser():
    import predict_speed  # noqa: E402  (imports torch and the models: only here)
    args = predict_speed.build_parser().parse_args(["--runs", "runs", "--video", "--video-frames", "10",
                                                    "--detect-every", "2", "--onnx-int8", "a.onnx"])
    assert (args.runs, args.video, args.video_frames, args.detect_every, args.onnx_int8) == \
        ("runs", True, 10, 2, "a.onnx")
    assert predict_speed.build_parser().parse_args([]).checkpoints is None  # the shipped ensemble
    args = ensemble_pool.build_parser().parse_args(["--members", "x=a.pt", "y=b.pt", "--combos", "x+y"])
    assert args.members == [("x", "a.pt"), ("y", "b.pt")] and args.combos == ["x+y"]


def test_widths_times_a_cell_and_tables_it_against_the_peak():
    import widths  # noqa: E402  (imports torch: only here)
    images_per_s, batch = widths.time_cell(8, 6, 1, steps=1)
    assert images_per_s > 0 and widths.BATCH_RANGE[0] <= batch <= widths.BATCH_RANGE[1]
    assert widths.cell_macs(8, 6, 2) == 2 * 6 * 6 * 8 * 8 * 9
    result = {"machine": {"processor": "cpu", "matmul_precision": "fp32", "matmul_peak_gmacs": 100},
              "precision": "fp32", "threads": 2, "depth": 2, "sizes": [12, 6], "widths": [32, 64],
              "cells": {f"{s}x{w}": {"gmacs": float(s + w)} for s in (12, 6) for w in (32, 64)}}
    table = widths.markdown(result)
    assert "| 12 | 44 (0.44) | 76 (0.76) |" in table and "| 6 | 38 (0.38) | 70 (0.70) |" in table
    assert widths.build_parser().parse_args(["--sizes", "6", "--depth", "3"]).depth == 3
