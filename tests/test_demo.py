"""`make demo`'s last step, and the example photos it uses: a newcomer's first answer is the shipped
ensemble on a real photograph, and it is right."""
import re

from conftest import ROOT

import predict

EXAMPLES = ROOT / "examples"


def demo_recipe():
    """The commands of the Makefile's demo target, one string each."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    return [line.strip() for line in recipe.splitlines() if not line.strip().startswith("@")]


def test_the_demo_ends_with_the_shipped_ensemble_on_the_astronaut_photo():
    last = demo_recipe()[-1]
    assert last.startswith("$(PY) predict.py examples/astronaut.jpg"), last
    assert "--ensemble" not in last and "--checkpoints" not in last and "--runs" not in last  # the default models
    assert "--out $(DEMO_OUT)" in last  # the annotated copy goes under runs/demo/


def test_the_shipped_ensemble_finds_the_astronaut_and_says_happy(tmp_path, capsys):
    records = predict.main([str(EXAMPLES / "astronaut.jpg"), "--out", str(tmp_path), "--json"])
    faces = records[0]["faces"]
    assert len(faces) == 1, faces
    top = faces[0]["top"]
    assert top[0]["emotion"] == "happy" and top[0]["probability"] > 0.5, top  # far from a coin toss either way
    assert (tmp_path / "astronaut.jpg").stat().st_size > 10_000
    assert "weights/ensemble.json" in capsys.readouterr().err.splitlines()[0]


def test_example_photos_are_small_and_say_where_they_come_from():
    photos = [p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert photos
    readme = (EXAMPLES / "README.md").read_text()
    for photo in photos:
        assert photo.stat().st_size <= 100_000, photo
        assert f"`{photo.name}`" in readme and "public domain" in readme, photo
