"""video.py through predict.py: frame-by-frame JSON and annotated videos, tracking, smoothing, a
stand-in camera, Ctrl-C, and bad videos. The Haar cascade finds the synthetic cartoon faces only now
and then, so tests that need detection replace it with a finder of the white frame around the face."""
import json
import os
import signal
import sys
import types

import cv2
import numpy as np
import pytest

from ferkit import cli
from ferkit import detect
from ferkit import inference
import predict
from ferkit import synthetic
from ferkit import synthetic_video
from ferkit import video

FPS, FRAMES = 25.0, 30
REAL_CAPTURE = cv2.VideoCapture


@pytest.fixture(scope="module")
def ensemble_file(trained_runs):
    return str(trained_runs / "evaluation" / "ensemble.json")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(path, true face box per frame) of a 320x240 MJPG clip: one face crossing, happy then sad."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    return path, synthetic_video.write_clip(path, frames=FRAMES, fps=FPS)


def framed_face(gray, cascade):
    """Stands in for detect.cascade_faces (with --detector haar): the white frame that synthetic_video
    draws around the face."""
    return synthetic_video.find_framed_face(gray)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def frame_count(path):
    capture, frames = REAL_CAPTURE(str(path)), 0
    while capture.read()[0]:
        frames += 1
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return frames, size, capture.get(cv2.CAP_PROP_FPS)


def top_switches(lines):
    """How often the top emotion of the first face changes from one frame to the next."""
    tops = [max(line["faces"][0]["probabilities"].items(), key=lambda item: item[1])[0] for line in lines]
    return sum(a != b for a, b in zip(tops, tops[1:]))


def test_json_lines_annotated_video_and_summary(tmp_path, clip, ensemble_file, monkeypatch, capsys):
    path, boxes = clip
    monkeypatch.setattr(detect, "cascade_faces", framed_face)
    out = tmp_path / "annotated"
    (result,) = predict.main([str(path), "--json", "--out", str(out), "--ensemble", ensemble_file, "--detector", "haar",
                              "--detect-every", "3", "--detect-side", "160"])  # detection at half size
    captured = capsys.readouterr()
    lines = json_lines(captured.out)
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["time"] for line in lines] == pytest.approx([i / FPS for i in range(FRAMES)], abs=1e-3)
    assert all(line["video"] == str(path) and len(line["faces"]) == 1 for line in lines)
    assert {line["faces"][0]["track"] for line in lines} == {1}  # one moving face, one track
    first = lines[0]["faces"][0]
    assert video.iou_matrix([first["box"]], [boxes[0]])[0, 0] > 0.8  # scaled back to full-size pixels
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert first["top"][0]["probability"] == max(first["probabilities"].values())

    assert [p.name for p in out.iterdir()] == ["clip.avi"]  # no partial file left behind
    assert frame_count(out / "clip.avi") == (FRAMES, (320, 240), FPS)
    assert result["frames"] == FRAMES and result["skipped_frames"] == 0
    assert sum(result["tracks"][1].values()) == pytest.approx(FRAMES / FPS)
    assert "track 1: 1.2 s on screen" in captured.err and "Traceback" not in captured.err


def found(*boxes):
    """Haar-like detections: boxes without landmarks."""
    return [detect.Face(box) for box in boxes]


def test_follow_keeps_ids_of_moving_faces(monkeypatch):
    monkeypatch.setattr(video, "STEADYING", 0)  # tracks jump to each detection: only the ids matter here
    tracks, next_id, changed = video.follow([], found((0, 0, 50, 50), (200, 0, 50, 50)), 1)
    assert [t.id for t in tracks] == [1, 2] and changed
    tracks, next_id, changed = video.follow(tracks, found((190, 5, 50, 50), (10, 5, 50, 50)), next_id)
    assert {t.id: t.box for t in tracks} == {1: (10, 5, 50, 50), 2: (190, 5, 50, 50)} and not changed
    tracks, next_id, changed = video.follow(tracks, found((12, 5, 50, 50), (100, 150, 40, 40)), next_id)
    assert {t.id: t.box for t in tracks} == {1: (12, 5, 50, 50), 2: (190, 5, 50, 50), 3: (100, 150, 40, 40)}
    assert changed  # face 2 was missed: it keeps its box for a while, and detection runs again soon
    for _ in range(video.MAX_MISSED_DETECTIONS):
        tracks, next_id, _ = video.follow(tracks, found((12, 5, 50, 50), (100, 150, 40, 40)), next_id)
    assert [t.id for t in tracks] == [1, 3]


def blended(old, new):
    """What steadying makes of a box: STEADYING of the old one, the rest of the new, in whole pixels."""
    return tuple(int(round(video.STEADYING * a + (1 - video.STEADYING) * b)) for a, b in zip(old, new))


# Five landmarks (eyes, nose, mouth corners) of a face tilted by about 18 degrees, inside FACE_BOX.
FACE_BOX = (125, 85, 60, 70)
LANDMARKS = np.array([[140, 100], [170, 110], [153, 122], [142, 136], [163, 143]], dtype=np.float32)


def test_a_matched_face_moves_part_of_the_way_and_a_new_face_starts_where_found():
    tracks, next_id, _ = video.follow([], [detect.Face(FACE_BOX, LANDMARKS)], 1)
    moved = detect.Face((133, 81, 60, 70), LANDMARKS + (8, -4))
    newcomer = detect.Face((10, 10, 40, 40), LANDMARKS - 120)
    tracks, next_id, _ = video.follow(tracks, [newcomer, moved], next_id)
    followed, new = sorted(tracks, key=lambda t: t.id)
    weight = video.STEADYING
    assert followed.id == 1 and followed.box == blended(FACE_BOX, moved.box) not in (FACE_BOX, moved.box)
    assert all(isinstance(v, int) for v in followed.box)
    np.testing.assert_allclose(followed.landmarks, weight * LANDMARKS + (1 - weight) * moved.landmarks)
    assert new.id == 2 and new.box == newcomer.box
    np.testing.assert_array_equal(new.landmarks, newcomer.landmarks)


def test_haar_boxes_are_steadied_too_and_a_switch_of_detector_starts_afresh():
    tracks, next_id, _ = video.follow([], found((100, 100, 40, 40)), 1)
    tracks, next_id, _ = video.follow(tracks, found((104, 96, 44, 40)), next_id)
    assert [(t.id, t.box, t.landmarks) for t in tracks] == [(1, blended((100, 100, 40, 40), (104, 96, 44, 40)), None)]
    assert tracks[0].box != (104, 96, 44, 40)
    tracks, next_id, _ = video.follow(tracks, [detect.Face((106, 98, 40, 40), LANDMARKS)], next_id)
    assert [(t.id, t.box) for t in tracks] == [(1, (106, 98, 40, 40))]  # nothing alike to blend with
    np.testing.assert_array_equal(tracks[0].landmarks, LANDMARKS)


def test_tracks_are_classified_from_the_crops_a_photo_gets(monkeypatch):
    """A track with landmarks: its aligned crop, from its steadied landmarks; one without: its box with the
    Haar margin. All of a frame's crops in one batch."""
    gray = np.random.default_rng(0).integers(0, 256, (240, 320), dtype=np.uint8)
    detections = [[detect.Face(FACE_BOX, LANDMARKS), detect.Face((230, 60, 50, 50))],
                  [detect.Face((128, 85, 60, 70), LANDMARKS + (6, 0)), detect.Face((230, 60, 50, 50))]]
    batches = []

    def predict_faces(faces):
        batches.append(np.array(faces))
        return np.full((len(faces), 7), 1 / 7)
    predictor = types.SimpleNamespace(align=True, predict_faces=predict_faces,
                                      detected=lambda gray, max_side: detections[len(batches)])
    options = types.SimpleNamespace(no_detect=False, detect_side=320, detect_every=5, smoothing=0.6)
    session = video.new_session()
    for _ in detections:  # new faces: the next frame looks again
        tracks = video.track_faces(predictor, gray, session, options)
    steadied = video.STEADYING * LANDMARKS + (1 - video.STEADYING) * (LANDMARKS + (6, 0))
    np.testing.assert_allclose(tracks[0].landmarks, steadied)
    aligned, boxed = batches[-1]
    np.testing.assert_array_equal(aligned, detect.face_crop(gray, detect.Face(tracks[0].box, steadied)))
    assert np.abs(aligned.astype(int) - detect.aligned_crop(gray, LANDMARKS + (6, 0))).mean() > 10  # not the raw ones
    assert np.abs(aligned.astype(int) - detect.crop_face(gray, tracks[0].box, 0)).mean() > 10  # not the box
    np.testing.assert_array_equal(boxed, detect.crop_face(gray, (230, 60, 50, 50), detect.MARGIN))


def noisy_predictions(classes):
    """A stand-in for Predictor.predict_faces: happy and sad nearly tied, with noise that flips them."""
    rng = np.random.default_rng(0)

    def predict_faces(predictor, faces):
        base = np.full(len(classes), 0.5 / (len(classes) - 2))
        base[[classes.index("happy"), classes.index("sad")]] = 0.25
        probs = np.clip(base + rng.normal(0, 0.05, (len(faces), len(classes))), 0.001, None)
        return probs / probs.sum(axis=1, keepdims=True)
    return predict_faces


def test_smoothing_reduces_label_switches(clip, ensemble_file, monkeypatch, capsys):
    switches = {}
    for smoothing in ("0", "0.8"):
        monkeypatch.setattr(inference.Predictor, "predict_faces", noisy_predictions(synthetic.CLASSES))
        predict.main([str(clip[0]), "--no-detect", "--json", "--smoothing", smoothing, "--ensemble", ensemble_file])
        switches[smoothing] = top_switches(json_lines(capsys.readouterr().out))
    assert switches["0"] >= 5 and switches["0.8"] <= switches["0"] / 2, switches


def test_camera_until_max_frames(tmp_path, clip, ensemble_file, monkeypatch, capsys):
    cameras = {0: str(clip[0])}  # camera 0 plays the clip; there is no camera 5
    monkeypatch.setattr(cv2, "VideoCapture", lambda source: REAL_CAPTURE(cameras.get(source, "/no/camera")))
    out = tmp_path / "annotated"
    (result,) = predict.main(["--camera", "0", "--max-frames", "7", "--no-detect", "--json", "--out", str(out),
                              "--ensemble", ensemble_file])
    lines = json_lines(capsys.readouterr().out)
    assert [line["frame"] for line in lines] == list(range(7)) and lines[0]["video"] == "camera 0"
    assert frame_count(out / "camera0.avi")[0] == 7 and result["frames"] == 7
    with pytest.raises(cli.UsageError, match="camera 5"):
        predict.main(["--camera", "5", "--ensemble", ensemble_file])


def test_ctrl_c_keeps_the_frames_done(tmp_path, clip, ensemble_file, monkeypatch, capsys):
    classify, calls = inference.Predictor.predict_faces, []

    def interrupted_at_frame_10(predictor, faces):
        calls.append(1)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return classify(predictor, faces)
    monkeypatch.setattr(inference.Predictor, "predict_faces", interrupted_at_frame_10)
    out = tmp_path / "annotated"
    (result,) = predict.main([str(clip[0]), "--no-detect", "--out", str(out), "--ensemble", ensemble_file])
    assert result["interrupted"] and result["frames"] == 10
    assert frame_count(out / "clip.avi")[0] == 10
    assert "interrupted" in capsys.readouterr().out


def corrupt_frame(data, index):
    """The MJPG clip's bytes with frame `index`'s JPEG header blanked: that frame cannot be decoded."""
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    return data[:starts[index]] + bytes(400) + data[starts[index] + 400:]


def test_undecodable_frame_is_skipped_and_counted(tmp_path, clip, ensemble_file, capsys):
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(corrupt_frame(clip[0].read_bytes(), 12))
    (result,) = predict.main([str(damaged), "--no-detect", "--ensemble", ensemble_file])
    assert result["skipped_frames"] == 1 and FRAMES - 2 <= result["frames"] <= FRAMES - 1
    assert "1 frame(s) failed to decode and were skipped" in capsys.readouterr().out


def test_truncated_video_is_an_error_after_its_frames_are_written(tmp_path, clip, ensemble_file):
    truncated, out = tmp_path / "truncated.avi", tmp_path / "annotated"
    data = clip[0].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(cli.UsageError, match="truncated.avi.*truncated"):
        predict.main([str(truncated), "--no-detect", "--out", str(out), "--ensemble", ensemble_file])
    assert 5 < frame_count(out / "truncated.avi")[0] < FRAMES


def test_unreadable_and_empty_videos_are_one_line_errors(tmp_path, ensemble_file, monkeypatch):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 20)
    empty = cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (320, 240))
    empty.release()
    monkeypatch.setattr(sys, "argv", ["predict.py", str(tmp_path / "garbage.mp4"), str(tmp_path / "empty.avi"),
                                      "--ensemble", ensemble_file])
    with pytest.raises(SystemExit) as stop:
        cli.run(predict.main)  # what `python predict.py` runs: a message as exit code means status 1
    error = stop.value.code
    assert isinstance(error, str) and "\n" not in error
    assert error.startswith("error: cannot use 2 video(s)") and "garbage.mp4" in error and "empty.avi" in error


def test_folder_with_images_and_videos(tmp_path, clip, ensemble_file, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.avi").write_bytes(clip[0].read_bytes())
    cv2.imwrite(str(folder / "face.png"), synthetic_video.face_picture("happy", 96))
    image, stream = predict.main([str(folder), "--no-detect", "--json", "--max-frames", "4",
                                  "--ensemble", ensemble_file])
    assert image["image"] == str(folder / "face.png") and stream["video"] == str(folder / "clip.avi")
    lines = json_lines(capsys.readouterr().out)
    assert [("image" in line, line.get("frame")) for line in lines] == [(True, None)] + [(False, i) for i in range(4)]
