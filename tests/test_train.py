"""models.py and train.py: shapes, the registry, a short real training run, checkpoints, resume."""
import csv
import itertools

import pytest
import torch
from conftest import QUICK_TRAINING

from ferkit import cli
from ferkit import inference
import models
from ferkit import device
from ferkit.checkpoint import given_flags, model_from_checkpoint, resumed_config
import train


@pytest.mark.parametrize("name", list(models.MODELS))
def test_model_output_shape_and_size(name):
    model = models.build_model(name, 6).eval()
    assert model(torch.rand(5, 1, 48, 48)).shape == (5, 6)
    size = models.describe_model(model)
    assert size["parameters"] > 10_000 and size["macs"] > size["parameters"]


def test_model_y_is_cheaper_than_model_x():
    x, y = (models.describe_model(models.build_model(n, 7)) for n in ("model_x", "model_y"))
    assert y["macs"] < x["macs"]


def test_histogram_equalization_spreads_each_face_over_the_range_and_keeps_its_order_of_grey_levels():
    torch.manual_seed(0)
    levels = torch.randint(100, 111, (3, 1, 48, 48))  # dim, low-contrast faces: eleven grey levels
    equalize = models.HistogramEqualization()
    equalized = equalize(levels / 255)
    assert equalized.amax(dim=(1, 2, 3)).eq(1).all() and equalized.amin(dim=(1, 2, 3)).lt(0.2).all()
    order = levels.flatten(1).argsort(dim=1)
    assert equalized.flatten(1).gather(1, order).diff(dim=1).ge(0).all()  # brighter stays brighter
    assert torch.equal(equalize(levels * 2 / 255), equalized)  # same ranks, same picture
    assert torch.equal(equalize(levels[1:2] / 255), equalized[1:2])  # each image by its own histogram


def test_stochastic_depth_skips_blocks_only_in_training_and_holds_no_weights():
    torch.manual_seed(0)
    plain, dropping = (models.residual_network(7, 8, 0.0, blocks=(1, 1, 1), drop_path=p) for p in (0.0, 1.0))
    assert plain.state_dict().keys() == dropping.state_dict().keys()
    dropping.load_state_dict(plain.state_dict())
    images = torch.rand(4, 1, 48, 48)
    assert torch.equal(plain.eval()(images), dropping.eval()(images))
    block = dropping[8]  # the last residual block, whose rate is drop_path itself
    x = torch.rand(4, 32, 6, 6)
    assert torch.equal(block.train()(x), torch.relu(block.shortcut(x)))


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_takes_bf16_only_on_cpus_with_native_bf16_kernels(monkeypatch, native, expected):
    monkeypatch.setattr(device, "cpu_runs_bf16_natively", lambda: native)
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == expected
    assert device.resolve_precision("bf16", cpu) == "bf16" and device.resolve_precision("fp32", cpu) == "fp32"


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="known models: model_x, model_y"):
        models.build_model("resnet", 7)


def test_help_lists_every_flag_with_its_default(capsys):
    parser = train.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert any(option in text for option in action.option_strings), action.dest
        assert action.help and action.help in text
    assert text.count("(default:") == len(parser._actions) - 1


def run(tmp_path, *extra, epochs=1, data="synthetic:20", models_=("model_x",)):
    train.main(["--data", data, "--epochs", str(epochs), "--out", str(tmp_path), "--models", *models_,
                *QUICK_TRAINING, *extra])
    return tmp_path / models_[0]


def test_short_training_beats_chance_clearly(tmp_path):
    run_dir = run(tmp_path, epochs=6, data="synthetic:100")
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    best = max(float(r["val_acc"]) for r in rows)
    assert best > 2 / 7, f"best validation accuracy {best:.3f} is not clearly above chance (1/7)"
    assert float(rows[0]["val_acc"]) < 0.9  # the task is not trivial
    assert (run_dir / "curves.png").stat().st_size > 5000


def test_restarts_begin_each_cycle_at_the_initial_rate_and_save_its_snapshot(tmp_path):
    run_dir = run(tmp_path, "--restarts", "2", epochs=4, models_=("model_y",))
    with open(run_dir / "metrics.csv") as file:
        rates = [float(r["lr"]) for r in csv.DictReader(file)]
    assert rates[0] == rates[2] == 0.01 and rates[1] < rates[0]
    snapshots = [run_dir / "snapshot_1.pt", run_dir / "snapshot_2.pt"]
    assert torch.load(snapshots[0], weights_only=True)["progress"]["epoch"] == 2
    assert inference.unique_names(snapshots) == ["model_y-snapshot_1", "model_y-snapshot_2"]


def test_restarts_must_divide_the_epochs(tmp_path):
    with pytest.raises(cli.UsageError, match="--epochs 3 is not a multiple of --restarts 2"):
        run(tmp_path, "--restarts", "2", epochs=3, models_=("model_y",))


def test_checkpoints_load_with_weights_only_and_hold_the_run(tmp_path):
    run_dir = run(tmp_path, epochs=2)
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert checkpoint["model_name"] == "model_x" and len(checkpoint["classes"]) == 7
        assert {"model", "optimizer", "scheduler", "rng", "config", "metrics", "progress"} <= set(checkpoint)
        assert checkpoint["config"]["seed"] == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["progress"]["epoch"] == 2
    model = model_from_checkpoint(torch.load(run_dir / "best.pt", weights_only=True))
    assert model(torch.rand(2, 1, 48, 48)).shape == (2, 7)
    assert (run_dir / "config.json").exists()


def final_weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_after_whole_epochs_matches_uninterrupted_run(tmp_path):
    # The plateau schedule is causal, so a 1-epoch run is the first epoch of a 3-epoch one (cosine's
    # decay depends on --epochs); mid-epoch resumes under cosine are covered by the next test.
    whole = run(tmp_path / "whole", "--schedule", "plateau", epochs=3)
    split = run(tmp_path / "split", "--schedule", "plateau", epochs=1)
    train.main(["--resume", "--out", str(tmp_path / "split"), "--models", "model_x", "--epochs", "3"])
    assert_same_weights(final_weights(whole), final_weights(split))
    with open(split / "metrics.csv") as file:
        assert [int(r["epoch"]) for r in csv.DictReader(file)] == [1, 2, 3]


AVERAGE_AND_MIX = ("--ema-decay", "0.9", "--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.5")
SWA_LAST_EPOCH = ("--swa-epochs", "1", "--swa-lr", "0.004")


@pytest.mark.parametrize("extra", [(), AVERAGE_AND_MIX, SWA_LAST_EPOCH], ids=["plain", "average-and-mix", "swa"])
def test_interrupt_mid_epoch_saves_and_resume_matches(tmp_path, monkeypatch, capsys, extra):
    whole = run(tmp_path / "whole", *extra, epochs=2)
    real_step = train.train_step
    calls = itertools.count()

    def step_then_interrupt(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if next(calls) == 5:  # 5 batches an epoch: as if Ctrl-C arrived during batch 2 of epoch 2
            train.stop_requested.set()
        return result

    monkeypatch.setattr(train, "train_step", step_then_interrupt)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "cut", *extra, epochs=2)
    assert stopped.value.code == 130 and "--resume" in capsys.readouterr().out
    monkeypatch.undo()
    train.stop_requested.clear()
    progress = torch.load(tmp_path / "cut" / "model_x" / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["batch"]) == (1, 2)
    train.main(["--resume", "--out", str(tmp_path / "cut"), "--models", "model_x"])
    assert_same_weights(final_weights(whole), final_weights(tmp_path / "cut" / "model_x"))
    if extra:
        averages = [torch.load(d / "last.pt", weights_only=True)["average"]
                    for d in (whole, tmp_path / "cut" / "model_x")]
        assert_same_weights(*averages)


def test_the_weight_average_is_validated_and_saved_as_best(tmp_path):
    run_dir = run(tmp_path, *AVERAGE_AND_MIX, epochs=3, data="synthetic:30")
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["progress"]["best_val_acc"] == pytest.approx(max(float(r["average_val_acc"]) for r in rows), abs=1e-5)
    # best.pt's weights are the average's at that epoch, batch-norm statistics included, not the trained ones.
    assert_same_weights(best["model"], {key[len("module."):]: value for key, value in best["average"].items()
                                        if key.startswith("module.")})
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert not torch.equal(last["model"]["0.weight"], last["average"]["module.0.weight"])


def test_swa_decays_to_its_rate_then_averages_the_last_epochs_into_best(tmp_path):
    run_dir = run(tmp_path, "--swa-epochs", "2", "--swa-lr", "0.004", epochs=4, models_=("model_y",))
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    # QUICK_TRAINING's --lr 0.01, halfway to the SWA rate after one of the two decay epochs, then held there
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.007, 0.004, 0.004])
    assert [r["average_val_acc"] != "" for r in rows] == [False, False, True, True]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["average"]["n_averaged"] == 2
    best = torch.load(run_dir / "best.pt", weights_only=True)
    accuracies = [float(r["average_val_acc"] or r["val_acc"]) for r in rows]
    assert best["progress"]["best_val_acc"] == pytest.approx(max(accuracies), abs=1e-5)
    if max(accuracies) > max(accuracies[:2]):  # the average won: best.pt holds it, not the trained weights
        assert_same_weights(best["model"], {key[len("module."):]: value for key, value in best["average"].items()
                                            if key.startswith("module.")})


@pytest.mark.parametrize("extra, message", [
    (("--swa-epochs", "2", "--ema-decay", "0.9"), "without --ema-decay"),
    (("--swa-epochs", "2", "--schedule", "plateau"), "one cosine cycle"),
    (("--swa-epochs", "3"), "fewer than --epochs 3"),
])
def test_swa_flags_that_cannot_work_are_refused(tmp_path, extra, message):
    with pytest.raises(cli.UsageError, match=message):
        run(tmp_path, *extra, epochs=3, models_=("model_y",))


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    run(tmp_path)
    with pytest.raises(cli.UsageError, match="already holds a run"):
        run(tmp_path)
    run(tmp_path, "--overwrite")


def test_a_flag_refused_for_a_later_model_is_refused_before_the_first_trains(tmp_path):
    # --swa-epochs 65 fits model_y's default 72 epochs but not model_x's 60.
    with pytest.raises(cli.UsageError, match="fewer than --epochs 60"):
        train.main(["--data", "synthetic:20", "--out", str(tmp_path), "--models", "model_y", "model_x",
                    "--swa-epochs", "65", *QUICK_TRAINING])
    assert not (tmp_path / "model_y").exists()


def learning_rates(run_dir):
    with open(run_dir / "metrics.csv") as file:
        return [float(r["lr"]) for r in csv.DictReader(file)]


def test_cosine_schedule_falls_from_lr_to_min_lr(tmp_path):
    run_dir = run(tmp_path, "--schedule", "cosine", "--min-lr", "0.001", epochs=3, models_=("model_y",))
    rates = learning_rates(run_dir)
    # QUICK_TRAINING's --lr 0.01; cosine over 3 epochs: full rate, halfway, a quarter of the way from the floor
    assert rates == pytest.approx([0.01, 0.001 + 0.009 * 0.75, 0.001 + 0.009 * 0.25])


def test_optimizer_flags_given_with_resume_take_effect(tmp_path):
    run_dir = run(tmp_path, epochs=1, models_=("model_y",))
    train.main(["--resume", "--out", str(tmp_path), "--models", "model_y", "--epochs", "2",
                "--weight-decay", "0.02", "--momentum", "0.5"])
    group = torch.load(run_dir / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["momentum"]) == (0.02, 0.5)


def test_resume_with_more_epochs_stretches_the_cosine_decay(tmp_path):
    run_dir = run(tmp_path, "--schedule", "cosine", "--min-lr", "0.001", epochs=2, models_=("model_y",))
    train.main(["--resume", "--out", str(tmp_path), "--models", "model_y", "--epochs", "4"])
    rates = learning_rates(run_dir)
    assert len(rates) == 4
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:])), rates  # no warm restart
    assert rates[-1] >= 0.001


def test_each_model_has_its_own_epochs_unless_epochs_is_given():
    parser = train.build_parser()
    unset, given = parser.parse_args([]), parser.parse_args(["--epochs", "5"])
    defaults = {name: models.default_epochs(name) for name in models.MODELS}
    assert {name: train.with_model_epochs(unset, name).epochs for name in models.MODELS} == defaults
    assert defaults == {"model_x": 60, "model_y": 72, "model_z": 80, "model_w": 60, "model_e": 72}  # docs/results.md
    assert {train.with_model_epochs(given, name).epochs for name in models.MODELS} == {5}
    assert "model_x 60, model_y 72" in " ".join(parser.format_help().split())
    # A run started with --epochs 5 and resumed without it keeps its 5, not the model's default.
    resumed = resumed_config(parser.parse_args(["--resume"]), given_flags(parser, ["--resume"]),
                                    {"config": vars(given)})
    assert train.with_model_epochs(resumed, "model_y").epochs == 5


def test_a_budget_sets_defaults_that_typed_flags_override():
    assert train.parse_args(["--budget", "20min"])[1].models == ["model_y"]
    assert train.with_model_epochs(train.parse_args(["--budget", "20min"])[1], "model_y").epochs == 36
    assert train.parse_args(["--budget", "20min", "--epochs", "5"])[1].epochs == 5
    assert train.parse_args(["--budget", "20min", "--models", "model_x"])[1].models == ["model_x"]
    assert train.parse_args([])[1].models == ["model_x", "model_y"]  # the 90-minute default
    assert "20min: --models model_y --epochs 36" in " ".join(train.build_parser().format_help().split())
    for flags in train.BUDGETS.values():  # every budget's flags are real flags with valid values
        train.parse_args(train.budget_flags(flags).split())


def test_given_flags_are_told_apart_from_defaults_by_parsing():
    parser = train.build_parser()
    argv = ["--resume", "--lr", "0.03", "--no-nesterov", "--models", "model_y", "--batch-size", "128"]
    assert given_flags(parser, argv) == {"resume", "lr", "nesterov", "models", "batch_size"}
    assert given_flags(parser, []) == set()
    assert parser.parse_args([]).lr == 0.03  # the probe's missing defaults do not leak into the parser


def test_a_flag_given_with_resume_wins_even_at_its_default_value(tmp_path):
    # Saved with --lr 0.01 (QUICK_TRAINING); 0.03 is the parser's default, given explicitly. Plateau:
    # the rate stays where it is set for the resumed epoch, so the optimizer shows it.
    run_dir = run(tmp_path, "--schedule", "plateau", epochs=1, data="synthetic:5")
    train.main(["--resume", "--out", str(tmp_path), "--models", "model_x", "--epochs", "2", "--lr", "0.03"])
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["config"]["lr"] == 0.03
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.03)
    assert learning_rates(run_dir) == pytest.approx([0.01, 0.03])
    assert checkpoint["config"]["batch_size"] == 32  # not given now: the saved value, not the default 128


@pytest.mark.parametrize("schedule, epochs_run", [("plateau", 2), ("cosine", 4)])
def test_only_the_plateau_schedule_stops_early(tmp_path, monkeypatch, schedule, epochs_run):
    monkeypatch.setattr(train, "evaluate_split", lambda *args: (1.0, 0.5))  # validation loss never improves
    # --min-lr equal to QUICK_TRAINING's --lr: the rate is at its floor from the start under either schedule.
    run_dir = run(tmp_path, "--schedule", schedule, "--min-lr", "0.01", "--plateau-patience", "0", epochs=4,
                  data="synthetic:5")
    assert len(learning_rates(run_dir)) == epochs_run


def test_a_registered_architecture_is_one_function(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "tiny", None)  # so the test leaves the registry as it found it

    @models.register(epochs=2)
    def tiny(num_classes):
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=4), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))

    assert models.default_epochs("tiny") == 2 and "| tiny |" in models.size_table()
    # argparse's --models choices and --epochs help are read from the registry when the parser is built.
    assert "tiny 2" in " ".join(train.build_parser().format_help().split())
    train.main(["--data", "synthetic:5", "--out", str(tmp_path), "--models", "tiny", *QUICK_TRAINING])
    assert len(learning_rates(tmp_path / "tiny")) == 2  # its own default epochs
    model = model_from_checkpoint(torch.load(tmp_path / "tiny" / "best.pt", weights_only=True))
    assert model(torch.rand(2, 1, 48, 48)).shape == (2, 7)


def test_cli_run_turns_a_usage_error_into_one_line_and_exit_status_1(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: train.main(["--data", "synthetic:5", "--resume", "--out", str(tmp_path)]))
    message = exit_info.value.code  # sys.exit with a string prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error: --resume: no ") and "\n" not in message
