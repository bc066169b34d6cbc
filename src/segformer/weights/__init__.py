"""Weights: where a model name points (built-in, file, folder, hub), every checkpoint format's
key map, loading and saving, and the models shipped in the package."""
