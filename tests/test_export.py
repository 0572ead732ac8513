"""export.py and the shipped weights: safetensors members, ensemble.json, hash checks, and prediction
with no training (the shipped-files test skips where weights/ is absent)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ferkit import cli
import ensemble
import evaluate
import export
from ferkit import inference
import predict
from ferkit import synthetic


@pytest.fixture(scope="module")
def equal_weights(trained_runs):
    """The runs' ensemble with both members weighted equally: one-epoch models are so alike that the fit
    may give one of them all the weight, and export.py leaves out members without weight."""
    record = json.loads((trained_runs / "evaluation" / "ensemble.json").read_text())
    for member in record["members"]:
        member["weight"] = 0.5
    path = trained_runs / "evaluation" / "equal.json"
    path.write_text(json.dumps(record))
    return str(path)


def export_to(out, equal_weights, *flags):
    export.main(["--ensemble", equal_weights, "--out", str(out), "--train-command",
                 "python train.py --data synthetic:20 --epochs 1", "--train-commit", "abc123", *flags])


@pytest.fixture(scope="module")
def exported(equal_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    export_to(out, equal_weights)
    return out


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_writes_members_and_a_complete_record(exported, trained_runs):
    record = json.loads((exported / "ensemble.json").read_text())
    assert sorted(p.name for p in exported.iterdir()) == ["ensemble.json", "model_x.safetensors", "model_y.safetensors"]
    assert record["classes"] == synthetic.CLASSES and record["tta"] == "none" and record["dtype"] in ("fp16", "fp32")
    assert record["trained_with"] == {"commands": ["python train.py --data synthetic:20 --epochs 1"], "commit": "abc123"}
    for member in record["members"]:
        assert member["architecture"] == member["name"] and member["classes"] == synthetic.CLASSES
        assert member["sha256"] == ensemble.file_hash(exported / member["path"])
        assert 0 <= member["val_accuracy"] <= 1
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1, abs=1e-5)
    assert 0 <= record["val_accuracy"] <= 1
    assert sum(p.stat().st_size for p in exported.iterdir()) < 16e6


def test_export_twice_gives_identical_bytes(exported, equal_weights, tmp_path):
    export_to(tmp_path, equal_weights)
    assert folder_bytes(tmp_path) == folder_bytes(exported)


def test_shipped_files_predict_like_the_checkpoints(exported, equal_weights):
    faces = synthetic.render_split("test", 2, seed=7)[0]
    from_runs = inference.Predictor.from_ensemble(equal_weights, precision="fp32")
    from_files = inference.Predictor.from_ensemble(exported / "ensemble.json", precision="fp32")
    assert from_files.classes == from_runs.classes
    np.testing.assert_allclose(from_files.predict_faces(faces), from_runs.predict_faces(faces), atol=2e-3)


@pytest.mark.parametrize("damage", ["one byte", "truncated"])
def test_a_changed_member_file_is_refused(exported, tmp_path, damage):
    copy = tmp_path / "weights"
    copy.mkdir()
    for name, content in folder_bytes(exported).items():
        (copy / name).write_bytes(content)
    member = copy / "model_x.safetensors"
    content = bytearray(member.read_bytes())
    if damage == "one byte":
        content[len(content) // 2] ^= 1
    else:
        content = content[:len(content) // 2]
    member.write_bytes(bytes(content))
    with pytest.raises(cli.UsageError, match=f"{member}.*SHA-256 differs.*git checkout weights/"):
        inference.Predictor.from_ensemble(copy / "ensemble.json")


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    foreign = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(cli.UsageError, match=f"{foreign} is not an ensemble member"):
        inference.load_member(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(cli.UsageError, match=f"cannot read {garbage}"):
        inference.load_member(garbage)


def test_predict_defaults_to_the_shipped_weights(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    monkeypatch.setattr(inference, "PRETRAINED", exported / "ensemble.json")
    image = tmp_path / "face.png"
    from PIL import Image
    Image.fromarray(synthetic.render_split("test", 1, seed=3)[0][0]).save(image)
    (record,) = predict.main([str(image), "--no-detect", "--json"])
    assert len(record["faces"]) == 1
    assert f"models from the shipped ensemble {exported / 'ensemble.json'}" in capsys.readouterr().err


def test_evaluate_scores_the_shipped_ensemble(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "PRETRAINED", exported / "ensemble.json")
    monkeypatch.setattr(evaluate, "PRETRAINED", exported / "ensemble.json")
    report = evaluate.main(["--pretrained", "--data", "synthetic:20", "--split", "val", "--out", str(tmp_path)])
    record = json.loads((exported / "ensemble.json").read_text())
    assert report["tta"] == record["tta"]
    assert report["ensemble"]["accuracy"] == pytest.approx(record["val_accuracy"], abs=1 / 28)
    with pytest.raises(cli.UsageError, match="--pretrained: pass --data"):
        evaluate.main(["--pretrained", "--out", str(tmp_path)])


def test_export_keeps_better_shipped_weights(exported, equal_weights, tmp_path):
    (tmp_path / "ensemble.json").write_text(json.dumps({**json.loads((exported / "ensemble.json").read_text()),
                                                        "val_accuracy": 1.01}))
    with pytest.raises(cli.UsageError, match="scores 101.00% on validation.*--force"):
        export_to(tmp_path, equal_weights)
    export_to(tmp_path, equal_weights, "--force")
    assert folder_bytes(tmp_path) == folder_bytes(exported)


def test_the_shipped_weights_load_and_classify():
    if not inference.PRETRAINED.is_file():
        pytest.skip(f"{inference.PRETRAINED} is not in this checkout")
    record = json.loads(inference.PRETRAINED.read_text())
    for member in record["members"]:
        assert ensemble.file_hash(inference.PRETRAINED.parent / member["path"]) == member["sha256"]
    graph = inference.PRETRAINED.parent / record["int8_graph"]["path"]
    assert ensemble.file_hash(graph) == record["int8_graph"]["sha256"]
    shipped = [inference.PRETRAINED, graph, *(inference.PRETRAINED.parent / m["path"] for m in record["members"])]
    assert sum(path.stat().st_size for path in shipped) <= 24e6  # the brief's bound on weights/
    for backend in ("auto", "torch"):  # on a CPU: the int8 graph, and the members in PyTorch
        predictor = inference.Predictor.pretrained(backend=backend, device="cpu")
        probs = predictor.predict_faces(synthetic.render_split("test", 1, seed=0)[0])
        assert probs.shape == (len(record["classes"]), len(record["classes"]))
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-3)
    assert predictor.backend == "torch" and inference.Predictor.pretrained(device="cpu").files == [graph]


def test_export_records_the_commands_that_trained_the_members(equal_weights, tmp_path):
    export.main(["--ensemble", equal_weights, "--out", str(tmp_path)])
    trained_with = json.loads((tmp_path / "ensemble.json").read_text())["trained_with"]
    (command,) = trained_with["commands"]  # both members came from one train.py call
    assert command.startswith("python train.py --data synthetic:20 --epochs 1")
    assert trained_with["commit"]  # a git commit, or the same None for both members outside git
