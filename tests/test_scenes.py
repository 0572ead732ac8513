"""The scene benchmark's generator (benchmarks/scenes.py), on synthetic faces: faces land at their known
boxes, sizes and tilts, the ceiling crop turns them upright, and matching counts found and false boxes."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import scenes  # noqa: E402  (benchmarks/ on the path)
from ferkit import detect, synthetic  # noqa: E402


def synthetic_faces():
    return synthetic.render_split("test", 2)[0]  # uint8 [14, 48, 48]


def test_scenes_place_faces_at_known_boxes_sizes_and_tilts():
    faces = synthetic_faces()
    rng = np.random.default_rng(0)
    generated = [scenes.make_scene(rng, faces) for _ in range(12)]
    placed = [p for _, ps in generated for p in ps]
    assert all(scene.shape == (480, 640) and scene.dtype == np.uint8 for scene, _ in generated)
    assert all(1 <= len(ps) <= 3 for _, ps in generated) and len(placed) > 12
    assert all(70 <= p.side <= 220 and abs(p.tilt) in scenes.TILTS for p in placed)
    for scene, ps in generated:
        for p in ps:  # the ceiling crop of each face is that face, upright, at its box
            crop = scenes.ceiling_crop(scene, p).astype(float)
            source = faces[p.index].astype(float)
            inner = slice(6, 42)  # the corners of a tilted face's square hold background
            assert np.abs(crop[inner, inner] - source[inner, inner]).mean() < 12
    assert np.array_equal(scenes.make_scene(np.random.default_rng(0), faces)[0], generated[0][0])  # seeded


def test_matching_counts_found_faces_and_false_boxes():
    placed = [scenes.Placed((100, 100), 100, 0, 0), scenes.Placed((400, 300), 150, 10, 1)]
    found = [detect.Face((60, 55, 90, 95)), detect.Face((500, 20, 60, 60)), detect.Face((330, 230, 140, 140))]
    assert scenes.match(found, placed) == {0: 0, 1: 2}
    crops, false_boxes = scenes.read_back([(np.zeros((480, 640), np.uint8), placed)], [found], align=False)
    assert false_boxes == 1 and all(c.shape == (48, 48) for c in crops)


def test_a_box_within_a_loosely_framed_square_is_on_its_face():
    square = scenes.Placed((100, 100), 140, 0, 0)  # a FER-2013 crop whose face fills a quarter of it
    on_the_face, a_sliver, across = detect.Face((70, 65, 60, 70)), detect.Face((60, 60, 20, 20)), \
        detect.Face((150, 60, 120, 80))
    assert scenes.iou(on_the_face.box, square.box()) < scenes.MATCH_IOU
    assert scenes.match([on_the_face], [square]) == {0: 0}
    assert scenes.match([a_sliver], [square]) == {} and scenes.match([across], [square]) == {}


def test_the_parser_takes_the_documented_flags():
    args = scenes.build_parser().parse_args(["--scenes", "20", "--tta", "flip", "--out", "x.json"])
    assert (args.scenes, args.tta, args.out) == (20, "flip", "x.json")
    assert args.detectors == list(detect.DETECTORS)


def test_framing_takes_the_parts_it_is_told_from_the_truth():
    import framing  # noqa: E402  (benchmarks/ on the path)
    placed = scenes.Placed((200.0, 150.0), 120, 20, 0)
    landmarks = np.array([[180, 140], [220, 140], [200, 155], [185, 175], [215, 175]], dtype=np.float32)
    face = detect.Face((150, 100, 100, 100), landmarks)
    aligned = detect.aligned_square(landmarks)
    centre, angle, side = framing.framing(placed, face, ())
    assert np.allclose(centre, aligned[0]) and angle == aligned[1] and side == aligned[2]
    centre, angle, side = framing.framing(placed, face, ("centre", "angle", "side"), 1.1)
    assert np.allclose(centre, (200, 150)) and angle == -20 and side == pytest.approx(132)
    assert framing.framing(placed, face, ("side",))[2] == 120 and framing.build_parser().parse_args([]).seed == 1


def test_views_difference_is_the_mean_gain_inside_its_bootstrap_interval():
    import views  # noqa: E402  (benchmarks/ on the path)
    reference = np.array([True] * 50 + [False] * 50)
    better = reference.copy()
    better[50:70] = True  # right on 20 more faces of 100
    gain, low, high = views.difference(better, reference)
    assert gain == 20.0 and 0 < low < gain < high
    assert views.difference(reference, reference) == [0.0, 0.0, 0.0]
    assert views.build_parser().parse_args([]).reference == "centre-full"
