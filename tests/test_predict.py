"""predict.py: face detection, cropping, ensemble prediction, output formats and annotated copies."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit import cli, detect
from ferkit import inference
import predict
from ferkit import synthetic
from conftest import SHARED_FER


def synthetic_face_on_canvas(path, size=(320, 240), face_size=144, seed=0):
    """A synthetic 48x48 face scaled up and pasted on a larger, darker background."""
    face = Image.fromarray(synthetic.render_split("test", 1, seed=seed)[0][0]).resize((face_size, face_size))
    canvas = Image.new("L", size, 40)
    canvas.paste(face, ((size[0] - face_size) // 2, (size[1] - face_size) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def faceless_image(path, size=(320, 240)):
    """A horizontal gradient with noise: texture for the cascade to scan, and no face in it."""
    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(30, 220, size[0]), (size[1], 1))
    pixels = np.clip(gradient + rng.normal(0, 12, gradient.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def json_records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ensemble_file(trained_runs):
    return str(trained_runs / "evaluation" / "ensemble.json")


def test_no_detect_json_is_well_formed(tmp_path, ensemble_file, capsys):
    image = synthetic_face_on_canvas(tmp_path / "face.png")
    records = predict.main([str(image), "--no-detect", "--json", "--ensemble", ensemble_file, "--top-k", "3"])
    printed = json_records(capsys.readouterr().out)
    assert printed == records and len(printed) == 1
    record = printed[0]
    assert record["image"] == str(image)
    (face,) = record["faces"]
    assert face["box"] == [0, 0, 320, 240]  # the whole image is the face
    assert len(face["top"]) == 3
    assert set(face["probabilities"]) == set(synthetic.CLASSES)
    assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    tops = [t["probability"] for t in face["top"]]
    assert tops == sorted(tops, reverse=True) and tops[0] == max(face["probabilities"].values())


def test_plain_checkpoints_match_a_single_model(tmp_path, trained_runs, capsys):
    image = synthetic_face_on_canvas(tmp_path / "face.png", seed=3)
    checkpoint = str(trained_runs / "model_x" / "best.pt")
    (record,) = predict.main([str(image), "--no-detect", "--json", "--checkpoints", checkpoint])
    member = inference.Predictor.from_members([inference.Member(Path(checkpoint))], "none", "cpu", "auto")
    direct = member.predict_faces(inference.crop_face(np.asarray(Image.open(image)), (0, 0, 320, 240), 0))
    assert list(record["faces"][0]["probabilities"].values()) == pytest.approx(direct[0].tolist(), abs=1e-3)


def test_real_face_is_detected():
    folder = SHARED_FER / "val" / "happy"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine")
    cascade = inference.load_cascade()
    region = (100, 60, 192, 192)  # where each 48x48 FER face goes, scaled 4x
    found = []
    for path in sorted(folder.iterdir())[:5]:
        canvas = Image.new("L", (400, 320), 128)
        canvas.paste(Image.open(path).convert("L").resize(region[2:], Image.Resampling.BILINEAR), region[:2])
        boxes = inference.detect_faces(np.asarray(canvas), cascade)
        found.append(any(overlap(box, region) > 0.4 for box in boxes))
    assert any(found), "the cascade found none of 5 FER-2013 faces scaled up 4x"


def overlap(a, b):
    """Intersection over union of two (x, y, w, h) boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_no_face_is_reported(tmp_path, ensemble_file, capsys):
    image = faceless_image(tmp_path / "gradient.png")
    assert inference.detect_faces(np.asarray(Image.open(image)), inference.load_cascade()) == []
    (record,) = predict.main([str(image), "--json", "--ensemble", ensemble_file])
    assert record["faces"] == [] and "no face" in record["note"]
    assert json_records(capsys.readouterr().out) == [record]


def test_annotated_copy_is_written_inside_out(tmp_path, ensemble_file, capsys):
    image = synthetic_face_on_canvas(tmp_path / "in" / "my photo (1).png")
    out = tmp_path / "annotated"
    (record,) = predict.main([str(image), "--no-detect", "--out", str(out), "--ensemble", ensemble_file])
    written = list(out.iterdir())
    assert [p.name for p in written] == ["my_photo__1_.png"] and Path(record["annotated"]) == written[0]
    with Image.open(written[0]) as annotated:
        assert annotated.size == (320, 240) and annotated.mode == "RGB"
        # the box is drawn in red on a gray picture
        pixels = np.asarray(annotated, dtype=np.int16)
        assert (pixels[..., 0] > pixels[..., 1] + 100).any()
    assert "face 1" in capsys.readouterr().out  # the terminal table


def test_folder_with_non_image_files(tmp_path, ensemble_file, capsys):
    folder = tmp_path / "photos"
    synthetic_face_on_canvas(folder / "a.png")
    synthetic_face_on_canvas(folder / "nested" / "b.jpg", seed=1)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = predict.main([str(folder), "--no-detect", "--ensemble", ensemble_file])  # no SystemExit: exit 0
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.jpg"]
    captured = capsys.readouterr()
    assert "skipped 2 file(s)" in captured.err and "Traceback" not in captured.err
    assert str(folder / "a.png") in captured.out


def test_missing_models_name_where_they_were_looked_for(tmp_path, monkeypatch):
    image = synthetic_face_on_canvas(tmp_path / "face.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "PRETRAINED", tmp_path / "no-weights" / "ensemble.json")
    with pytest.raises(cli.UsageError) as stop:
        predict.main([str(image)])
    message = str(stop.value)
    assert "no-weights" in message and "git checkout weights/" in message and "--runs DIR" in message
    with pytest.raises(cli.UsageError, match=r"no trained models in empty: looked for empty/evaluation/ensemble.json "
                                             r"and empty/\*\*/best.pt. Train first \(python train.py --out empty"):
        predict.main([str(image), "--runs", "empty"])


def test_the_default_is_the_shipped_ensemble_even_beside_a_trained_run(tmp_path, trained_runs, monkeypatch, capsys):
    """After make demo, runs/ holds toy models; a bare predict.py still answers with weights/, and --runs
    picks a folder's models: its fitted ensemble, else its best.pt files with equal weights."""
    if not inference.PRETRAINED.is_file():
        pytest.skip(f"{inference.PRETRAINED} is not in this checkout")
    image = synthetic_face_on_canvas(tmp_path / "face.png")
    (tmp_path / "runs" / "model_x").mkdir(parents=True)
    (tmp_path / "runs" / "model_x" / "best.pt").write_bytes((trained_runs / "model_x" / "best.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    predict.main([str(image), "--no-detect", "--json", "--tta", "none"])
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"models from the shipped ensemble {inference.PRETRAINED}: ") and "runs" not in first
    predict.main([str(image), "--no-detect", "--json", "--runs", "runs"])
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"models from runs/**/best.pt: {Path('runs/model_x/best.pt')}; tta {inference.ONE_FACE_TTA}"
    predict.main([str(image), "--no-detect", "--json", "--runs", str(trained_runs)])
    fitted = trained_runs / "evaluation" / "ensemble.json"
    assert capsys.readouterr().err.splitlines()[0].startswith(f"models from {fitted}: ")


def test_ensemble_members_are_found_from_the_ensemble_folder(tmp_path, trained_runs, monkeypatch):
    """Member paths are stored relative to ensemble.json, so they resolve from any working folder."""
    record = json.loads((trained_runs / "evaluation" / "ensemble.json").read_text())
    assert all(not Path(m["path"]).is_absolute() for m in record["members"])
    monkeypatch.chdir(tmp_path)
    choice = inference.choose_models(ensemble_file=str(trained_runs / "evaluation" / "ensemble.json"))
    assert choice.tta == record["tta"] and choice.source.endswith("ensemble.json")
    weighted = [m["path"] for m in record["members"] if m["weight"] > 0]  # the fit may switch a member off
    assert [m.path.resolve() for m in choice.members] == [(trained_runs / "evaluation" / p).resolve() for p in weighted]
    assert sum(m.weight for m in choice.members) == pytest.approx(1)


def test_predictor_api_on_a_photo_and_on_a_face(tmp_path, ensemble_file):
    predictor = inference.Predictor.from_ensemble(ensemble_file)
    image = synthetic_face_on_canvas(tmp_path / "face.png", seed=5)
    (face,) = predictor.predict(image, detect=False)
    assert face["box"] == [0, 0, 320, 240] and set(face["probabilities"]) == set(predictor.classes)
    crop = inference.crop_face(np.asarray(Image.open(image)), (0, 0, 320, 240), 0)
    probs = predictor.predict_faces(crop)
    assert probs.shape == (1, len(predictor.classes)) and probs.sum() == pytest.approx(1, abs=1e-4)
    assert list(face["probabilities"].values()) == pytest.approx(probs[0].tolist(), abs=1e-3)
    assert predictor.predict(Image.open(image), detect=False) == [face]  # a PIL image works like its path


def test_a_batch_s_views_in_one_pass_answer_as_one_pass_per_view(trained_runs):
    """batched_probs stacks each batch's TTA views into one forward pass; the answer is each view's own pass,
    averaged, whatever the batch size (here one image per pass, and all of them at once)."""
    model = inference.load_member(trained_runs / "model_y" / "best.pt").model
    images = torch.from_numpy(synthetic.render_split("test", 2, seed=9)[0]).unsqueeze(1)
    with torch.inference_mode():
        views = inference.tta_views(images.float() / 255, "tencrop-full")
        expected = sum(torch.softmax(model(v), dim=1) for v in views).numpy() / len(views)
    for batch_size in (1, 12, 500):
        np.testing.assert_allclose(inference.predict_probs(model, images, "tencrop-full", batch_size), expected,
                                   atol=1e-5)


def test_an_annotated_copy_never_takes_an_input_s_name(tmp_path):
    used = set()
    photo = tmp_path / "a.png"
    assert inference.annotated_path(tmp_path, photo, tmp_path, used, ".png") == tmp_path / "a-2.png"  # --out = input
    assert inference.annotated_path(tmp_path / "out", photo, tmp_path, used, ".png") == tmp_path / "out" / "a.png"
    assert inference.annotated_path(tmp_path / "out", photo, tmp_path, used, ".png") == tmp_path / "out" / "a-3.png"
    nested = tmp_path / "trip" / "day 1.jpg"
    assert inference.annotated_path(tmp_path / "out", nested, tmp_path, used, ".avi").name == "trip_day_1.avi"


def test_an_opencv_without_haar_cascades_gets_a_usage_error_naming_the_fix(monkeypatch):
    monkeypatch.delattr(detect.cv2, "CascadeClassifier")  # as in builds without object detection
    with pytest.raises(cli.UsageError, match=r"opencv-python-headless>=4.8,<5.*--no-detect"):
        inference.load_cascade()


def test_member_names_widen_only_as_far_as_a_clash_needs():
    assert inference.unique_names(["runs/model_x/best.pt", "weights/model_y.safetensors"]) == ["model_x", "model_y"]
    snapshots = ["runs/model_y/snapshot_1.pt", "runs/model_y/snapshot_2.pt"]
    assert inference.unique_names(snapshots) == ["model_y-snapshot_1", "model_y-snapshot_2"]
    two_runs = ["runs/fer7/model_x/best.pt", "runs/fer6/model_x/best.pt"]
    assert inference.unique_names(two_runs) == ["fer7-model_x", "fer6-model_x"]
    assert inference.unique_names([*two_runs, "runs/fer7/model_x/last.pt"]) == \
        ["fer7-model_x-best", "fer6-model_x-best", "fer7-model_x-last"]
