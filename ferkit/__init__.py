"""The library behind the scripts at the repository's root (train.py, evaluate.py, predict.py, export.py,
app.py): what they share, kept out of the way of a reader who wants the recipe. models.py, data.py and
ensemble.py stay at the root, as the original design has them."""
