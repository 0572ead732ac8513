"""The ONNX deployment format: export.py --format onnx / onnx-int8, parity of ONNX Runtime with PyTorch
fp32, the metadata and its checks, and predict.py / evaluate.py with --backend onnx. The members are two
small random-weight networks, so nothing is trained here."""
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT
from PIL import Image

from ferkit import cli
import ensemble
import evaluate
import export
from ferkit import inference
import models
from ferkit import onnx_graph
import predict
from ferkit import synthetic

WEIGHTS = [0.4, 0.6]


def random_member(name, seed):
    torch.manual_seed(seed)
    model = models.build_model(name, len(synthetic.CLASSES)).eval()
    with torch.no_grad():
        # Default initialisation gives almost the same output for every image, which would hide a mix-up
        # of the images in a batch; larger weights make the outputs differ from image to image.
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3)
    return model


def save_random_ensemble(runs, names, weights):
    """runs/NAME/best.pt for each name, saved as train.py saves them, and runs/evaluation/ensemble.json
    weighting them by `weights`."""
    paths = []
    for seed, name in enumerate(names):
        path = runs / name / "best.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model_name": name, "classes": synthetic.CLASSES, "config": {"data": "synthetic:20"},
                    "model": random_member(name, seed).state_dict()}, path)
        paths.append(path)
    fit = {"method": "equal", "weights": weights, "val_accuracy": 0.0, "val_nll": 0.0, "candidates": {}}
    ensemble.save_ensemble(runs / "evaluation" / "ensemble.json", paths, synthetic.CLASSES, fit, "none")
    return runs / "evaluation" / "ensemble.json"


@pytest.fixture(scope="module")
def random_ensemble(tmp_path_factory):
    """model_x and model_y weighted 0.4 and 0.6."""
    return save_random_ensemble(tmp_path_factory.mktemp("runs"), ["model_x", "model_y"], WEIGHTS)


def export_onnx(ensemble_file, out, fmt="onnx"):
    return export.main(["--ensemble", str(ensemble_file), "--out", str(out), "--format", fmt, "--threads", "1"])


@pytest.fixture(scope="module")
def exported(random_ensemble, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    export_onnx(random_ensemble, out)
    return out / "ensemble.onnx"


def faces(count, seed=11):
    return synthetic.render_split("test", -(-count // len(synthetic.CLASSES)), seed=seed)[0][:count]


@pytest.mark.parametrize("tta", ["none", "flip"])
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_matches_pytorch_fp32(random_ensemble, exported, batch, tta):
    images = faces(batch)
    torch_probs = inference.Predictor.from_ensemble(random_ensemble, tta, device="cpu", precision="fp32") \
        .predict_faces(images)
    onnx_probs = inference.Predictor.from_onnx(exported, tta, threads=1).predict_faces(images)
    assert onnx_probs.shape == torch_probs.shape == (batch, len(synthetic.CLASSES))
    np.testing.assert_allclose(onnx_probs, torch_probs, rtol=1e-3, atol=1e-5)
    assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()


def test_the_graph_holds_the_ensemble_and_its_metadata(exported):
    assert sorted(p.name for p in exported.parent.iterdir()) == ["ensemble.onnx"]
    model = onnx.load(str(exported))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == synthetic.CLASSES
    assert json.loads(props["weights"]) == WEIGHTS
    assert json.loads(props["members"]) == ["model_x", "model_y"]
    assert (props["tta"], props["precision"], props["method"]) == ("none", "fp32", "equal")
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not graph_input.type.tensor_type.shape.dim[0].HasField("dim_value")  # any batch size
    assert sum(node.op_type == "Softmax" for node in model.graph.node) == 2  # both members, inside the graph
    predictor = inference.Predictor.from_onnx(exported)
    assert predictor.classes == synthetic.CLASSES and predictor.about.weights.tolist() == WEIGHTS
    assert predictor.predict_faces(np.zeros((0, 48, 48), np.uint8)).shape == (0, len(synthetic.CLASSES))


def foreign_graph(path):
    """A valid ONNX file of the right shape without our metadata: an identity graph."""
    shape = ["N", 1, 48, 48]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["pixels"], ["probabilities"])], "other",
                                   [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, shape)],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, shape)])
    onnx.save(onnx.helper.make_model(graph), str(path))


@pytest.mark.parametrize("damage, message", [("foreign", "is not an ensemble exported by export.py"),
                                             ("random bytes", "cannot read"), ("truncated", "cannot read"),
                                             ("empty", "cannot read"), ("missing", "no ONNX file")])
def test_a_file_that_is_not_our_ensemble_is_refused(exported, tmp_path, damage, message):
    path = tmp_path / "model.onnx"
    if damage == "foreign":
        foreign_graph(path)
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        path.write_bytes(exported.read_bytes()[:exported.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(cli.UsageError, match=f"{path}.*{message}|{message}.*{path}") as caught:
        inference.Predictor.from_onnx(path)
    assert "export.py --format onnx" in str(caught.value)


@pytest.mark.parametrize("key, value, message", [("classes", "[]", "class list"), ("classes", "[1, 2]", "class list"),
                                                 ("weights", "[1.0]", "weights"), ("weights", "[0.5, NaN]", "weights"),
                                                 ("members", "not json", "JSONDecodeError"), ("tta", "mirror", "tta"),
                                                 ("format", "fer-onnx-0", "format")])
def test_metadata_is_checked_before_use(exported, tmp_path, key, value, message):
    model = onnx.load(str(exported))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    path = tmp_path / "changed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(cli.UsageError, match=f"{path} is not an ensemble exported by export.py.*{message}"):
        inference.Predictor.from_onnx(path)


def test_a_graph_of_another_shape_is_refused_even_with_our_metadata(exported, tmp_path):
    path = tmp_path / "identity.onnx"
    foreign_graph(path)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {p.key: p.value for p in onnx.load(str(exported)).metadata_props})
    onnx.save(model, str(path))
    with pytest.raises(cli.UsageError, match=f"{path} does not take float32 .* return 7 class probabilities"):
        inference.Predictor.from_onnx(path)


def face_image(folder):
    path = folder / "face.png"
    Image.fromarray(faces(1, seed=3)[0]).save(path)
    return path


def test_predict_with_the_onnx_backend_answers_like_torch(random_ensemble, exported, tmp_path, capsys):
    image = face_image(tmp_path)
    (from_torch,) = predict.main([str(image), "--no-detect", "--json", "--ensemble", str(random_ensemble),
                                  "--precision", "fp32", "--threads", "1"])
    (from_onnx,) = predict.main([str(image), "--no-detect", "--json", "--backend", "onnx", "--onnx", str(exported),
                                 "--threads", "1"])
    assert f"ONNX ensemble {exported} (model_x, model_y; fp32, ONNX Runtime CPU); tta {inference.ONE_FACE_TTA}" in capsys.readouterr().err
    assert from_onnx.keys() == from_torch.keys()
    (face_torch,), (face_onnx,) = from_torch["faces"], from_onnx["faces"]
    assert face_onnx["box"] == face_torch["box"] and face_onnx["top"][0]["emotion"] == face_torch["top"][0]["emotion"]
    for emotion, probability in face_torch["probabilities"].items():
        assert face_onnx["probabilities"][emotion] == pytest.approx(probability, abs=2e-4)  # rounded to 4 digits


@pytest.mark.parametrize("flags, message", [(["--backend", "torch", "--onnx", "x.onnx"], "add --backend onnx"),
                                            (["--backend", "onnx", "--onnx", "x.onnx", "--checkpoints", "a.pt"],
                                             "--onnx x.onnx runs the ensemble in that file, and --checkpoints name "
                                             "other models: leave them out"),
                                            (["--backend", "onnx", "--onnx", "missing.onnx"],
                                             "no ONNX file missing.onnx"),
                                            (["--backend", "onnx", "--checkpoints", "a.pt"], "no model file a.pt")])
def test_predict_explains_backend_flags_that_do_not_fit(tmp_path, flags, message):
    with pytest.raises(cli.UsageError, match=message):
        predict.main([str(face_image(tmp_path)), "--no-detect", *flags])


def test_evaluate_reports_the_onnx_ensemble(random_ensemble, exported, tmp_path):
    report = evaluate.main(["--backend", "onnx", "--onnx", str(exported), "--data", "synthetic:20", "--split", "val",
                            "--out", str(tmp_path), "--threads", "1"])
    split = inference.align_classes(evaluate.data.load_split("synthetic:20", "val"), synthetic.CLASSES)
    torch_probs = inference.Predictor.from_ensemble(random_ensemble, device="cpu", precision="fp32") \
        .probabilities(split[0])
    assert report["backend"] == "onnx" and report["tta"] == "none" and report["models"] == {}
    assert report["ensemble"]["accuracy"] == ensemble.accuracy(torch_probs, split[1])
    assert report["ensemble"]["weights"] == dict(zip(["model_x", "model_y"], WEIGHTS))
    assert (tmp_path / "report.md").is_file() and (tmp_path / "confusion_ensemble.png").is_file()
    with pytest.raises(cli.UsageError, match="--backend onnx: pass --data"):
        evaluate.main(["--backend", "onnx", "--onnx", str(exported), "--out", str(tmp_path)])
    with pytest.raises(cli.UsageError, match="--onnx .* runs the ensemble in that file, and --pretrained name"):
        evaluate.main(["--backend", "onnx", "--onnx", str(exported), "--pretrained", "--out", str(tmp_path)])


def test_evaluate_builds_the_graph_of_the_runs_ensemble(random_ensemble, tmp_path, monkeypatch, capsys):
    """--backend onnx with no --onnx: the graph of the ensemble the torch backend would use (here the runs'
    fitted evaluation/ensemble.json), built into the cache with no export, scored on the checkpoints' data."""
    monkeypatch.setattr(evaluate.data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    runs = random_ensemble.parent.parent
    report = evaluate.main(["--backend", "onnx", "--runs", str(runs), "--out", str(tmp_path / "eval"),
                            "--split", "val", "--tta", "flip", "--threads", "1"])
    assert f"models from {random_ensemble}" in capsys.readouterr().err
    (graph,) = (tmp_path / "cache" / "onnx").iterdir()
    assert report["ensemble"]["onnx"] == str(graph) and report["data"] == "synthetic:20" and report["tta"] == "flip"
    split = inference.align_classes(evaluate.data.load_split("synthetic:20", "val"), synthetic.CLASSES)
    torch_probs = inference.Predictor.from_ensemble(random_ensemble, "flip", device="cpu", precision="fp32") \
        .probabilities(split[0])
    assert report["ensemble"]["accuracy"] == ensemble.accuracy(torch_probs, split[1])
    assert report["ensemble"]["weights"] == dict(zip(["model_x", "model_y"], WEIGHTS))


def test_int8_is_written_only_within_tolerance(tmp_path, monkeypatch, capsys):
    source = save_random_ensemble(tmp_path / "runs", ["model_x", "model_y"], WEIGHTS)
    out = tmp_path / "weights"
    monkeypatch.setattr(export, "INT8_TOLERANCE", 1.0)  # random weights: any accuracy change is let through
    export_onnx(source, out, "onnx-int8")
    printed = capsys.readouterr().out
    assert "fp32: ensemble" in printed and "int8: ensemble" in printed
    int8 = out / onnx_graph.INT8_NAME
    predictor = inference.Predictor.from_onnx(int8)
    assert predictor.about.precision == "int8" and predictor.classes == synthetic.CLASSES
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8)).graph.node)
    probs = predictor.predict_faces(faces(7))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-3)
    recorded = ensemble.load_ensemble(source)["int8_graph"]
    assert (source.parent / recorded["path"]).resolve() == int8.resolve()
    assert recorded["sha256"] == ensemble.file_hash(int8) and set(recorded) >= {"val_accuracy", "fp32_val_accuracy"}

    monkeypatch.setattr(export, "INT8_TOLERANCE", -1.0)  # never within: refused, the earlier file and entry removed
    export_onnx(source, out, "onnx-int8")
    assert f"{onnx_graph.INT8_NAME} not written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["ensemble.onnx"]
    assert "int8_graph" not in ensemble.load_ensemble(source)


def recorded_int8(tmp_path, monkeypatch):
    """A random ensemble whose ensemble.json records its int8 graph, as export.py --format onnx-int8 leaves it."""
    source = save_random_ensemble(tmp_path / "runs", ["model_x", "model_y"], WEIGHTS)
    monkeypatch.setattr(export, "INT8_TOLERANCE", 1.0)
    export_onnx(source, tmp_path / "weights", "onnx-int8")
    return source, tmp_path / "weights" / onnx_graph.INT8_NAME


def test_predict_runs_the_recorded_int8_graph_on_a_cpu_and_refuses_a_changed_one(tmp_path, monkeypatch, capsys):
    source, int8 = recorded_int8(tmp_path, monkeypatch)
    image = str(face_image(tmp_path))
    capsys.readouterr()
    (record,) = predict.main([image, "--no-detect", "--json", "--ensemble", str(source)])
    assert f"as the ONNX graph {int8} (int8), run by ONNX Runtime" in capsys.readouterr().err
    (from_torch,) = predict.main([image, "--no-detect", "--json", "--ensemble", str(source), "--backend", "torch"])
    assert "ONNX" not in capsys.readouterr().err
    assert record["faces"][0]["probabilities"].keys() == from_torch["faces"][0]["probabilities"].keys()
    int8.write_bytes(int8.read_bytes()[:-1] + b"\0")
    with pytest.raises(cli.UsageError, match="is not the int8 ONNX graph its ensemble.json recorded"):
        predict.main([image, "--no-detect", "--ensemble", str(source)])
    int8.unlink()
    with pytest.raises(cli.UsageError, match="the int8 ONNX graph its ensemble.json names, is missing"):
        predict.main([image, "--no-detect", "--ensemble", str(source)])
    predict.main([image, "--no-detect", "--ensemble", str(source), "--backend", "torch"])  # torch needs no graph


def test_auto_is_onnx_runtime_on_a_cpu_and_torch_on_a_gpu(monkeypatch):
    assert inference.resolve_backend("auto", "cpu") == "onnx"
    assert inference.resolve_backend("torch", "cpu") == "torch" and inference.resolve_backend("onnx", "cpu") == "onnx"
    monkeypatch.setattr(inference, "pick_device", lambda device: torch.device("cuda"))
    assert inference.resolve_backend("auto", "cuda") == "torch"


@pytest.mark.parametrize("entry", [{"path": 3, "sha256": "0" * 64}, {"path": "g.onnx", "sha256": "abc"}, "g.onnx"])
def test_a_malformed_int8_entry_is_refused_naming_the_file(random_ensemble, tmp_path, entry):
    broken = tmp_path / "ensemble.json"
    broken.write_text(json.dumps({**json.loads(random_ensemble.read_text()), "int8_graph": entry}))
    with pytest.raises(cli.UsageError, match=f"{broken} is not a valid ensemble file: \"int8_graph\" must be"):
        ensemble.load_ensemble(broken)


def test_calibration_images_are_a_seeded_choice_of_training_images():
    train = torch.arange(500 * 48 * 48, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(500, 1, 48, 48)
    chosen = onnx_graph.calibration_images(train)
    assert chosen.shape == (onnx_graph.CALIBRATION_IMAGES, 1, 48, 48) and chosen.dtype == np.float32
    np.testing.assert_array_equal(chosen, onnx_graph.calibration_images(train))
    assert len(onnx_graph.calibration_images(train[:20])) == 20


def test_the_torch_path_does_not_import_onnx():
    code = ("import sys, predict, evaluate, export, app; from ferkit import inference, onnx_graph, video; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def write_faces(folder, count, seed=0):
    """`count` synthetic 48x48 faces as PNGs, and as many random 48x48 crops of a noisy gradient."""
    folder.mkdir(parents=True)
    for i, face in enumerate(faces(count, seed=seed)):
        Image.fromarray(face).save(folder / f"face{i:02d}.png")
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.linspace(0, 255, 48)[None, :] * rng.random() + rng.normal(0, 30, (48, 48)) + 60
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"crop{i:02d}.png")
    return folder


def tops(records):
    return {record["image"]: record["faces"][0]["top"][0]["emotion"] for record in records}


@pytest.mark.skipif(not inference.PRETRAINED.is_file(), reason="the shipped weights are not in this checkout")
def test_on_a_cpu_predict_runs_the_shipped_int8_graph_and_agrees_with_torch(tmp_path, capsys):
    folder = write_faces(tmp_path / "faces", 25)
    common = [str(folder), "--no-detect", "--json", "--threads", "2", "--tta", "none"]
    from_int8 = predict.main(common)
    first = capsys.readouterr().err
    assert f"as the ONNX graph {inference.WEIGHTS_DIR / onnx_graph.INT8_NAME} (int8)" in first
    from_torch = predict.main([*common, "--backend", "torch", "--precision", "fp32"])
    assert len(from_int8) == 50
    faces_agree = np.mean([tops(from_torch)[image] == top for image, top in tops(from_int8).items()
                           if Path(image).name.startswith("face")])
    distances = [0.5 * sum(abs(a["faces"][0]["probabilities"][c] - b["faces"][0]["probabilities"][c]) for c in
                           a["faces"][0]["probabilities"]) for a, b in zip(from_int8, from_torch)]
    assert faces_agree >= 0.96 and np.mean(distances) < 0.08, (faces_agree, np.mean(distances))


@pytest.mark.skipif(not inference.PRETRAINED.is_file(), reason="the shipped weights are not in this checkout")
def test_models_without_a_recorded_graph_get_theirs_built_on_first_use(tmp_path, monkeypatch, capsys):
    """A shipped member named with --checkpoints (no ensemble file, so no int8 graph): --backend onnx builds
    its fp32 graph on first use (no data, no export.py) into FER_CACHE_DIR's onnx/ folder, `python
    predict.py` reuses it, and it answers as torch does."""
    monkeypatch.setattr(inference.data, "DEFAULT_CACHE_DIR", tmp_path / "cache")  # as FER_CACHE_DIR sets it
    folder = write_faces(tmp_path / "faces", 25)
    members = [str(inference.WEIGHTS_DIR / "model_y.safetensors")]  # the smallest: its graph builds fastest
    common = [str(folder), "--no-detect", "--json", "--threads", "2", "--tta", "none", "--checkpoints", *members]
    from_onnx = predict.main(common)
    first = capsys.readouterr().err
    assert "--checkpoints" in first.splitlines()[0] and "building the ONNX graph" in first
    (graph,) = (tmp_path / "cache" / "onnx").iterdir()
    assert graph.suffix == ".onnx" and f"as the ONNX graph {graph} (fp32)" in first
    built = graph.stat().st_mtime_ns
    from_torch = predict.main([*common, "--backend", "torch", "--precision", "fp32"])
    agree = np.mean([tops(from_torch)[image] == top for image, top in tops(from_onnx).items()])
    assert len(from_onnx) == 50 and agree >= 0.98, agree
    again = subprocess.run([sys.executable, "predict.py", *common, "--backend", "onnx", "--tta", "flip"], cwd=ROOT,
                           env={**os.environ, "FER_CACHE_DIR": str(tmp_path / "cache")}, capture_output=True,
                           text=True, check=True)
    assert "building" not in again.stderr and f"as the ONNX graph {graph}" in again.stderr
    assert len(again.stdout.splitlines()) == 50
    assert [p.name for p in graph.parent.iterdir()] == [graph.name] and graph.stat().st_mtime_ns == built


def test_the_cache_key_follows_the_members_and_their_weights(random_ensemble, tmp_path, monkeypatch):
    monkeypatch.setattr(inference.data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    members = inference.load_members(inference.choose_models(ensemble_file=random_ensemble).members)
    path = inference.graph_path(members, synthetic.CLASSES)
    assert path.parent == tmp_path / "cache" / "onnx"
    doubled = [m._replace(weight=2 * m.weight) for m in members]  # the same weights once normalised
    assert inference.graph_path(doubled, synthetic.CLASSES) == path
    assert inference.graph_path([members[0]._replace(weight=0.5), members[1]], synthetic.CLASSES) != path
    assert inference.graph_path(members[::-1], synthetic.CLASSES) != path
    assert inference.graph_path(members, synthetic.CLASSES[::-1]) != path


def test_an_unreadable_cached_graph_is_built_again(random_ensemble, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference.data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    members = inference.choose_models(ensemble_file=random_ensemble).members
    path = inference.graph_path(inference.load_members(members), synthetic.CLASSES)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")
    predictor = inference.Predictor.from_members(members, "none", backend="onnx", threads=1)
    assert "building it again" in capsys.readouterr().err and predictor.files == [path]
    torch_probs = inference.Predictor.from_members(members, "none", "cpu", "fp32").predict_faces(faces(7))
    np.testing.assert_allclose(predictor.predict_faces(faces(7)), torch_probs, rtol=1e-3, atol=1e-5)
