"""Feature extraction: the Ray Data pipeline (pipeline.py), the features file (featurefile.py)
and `python -m boatray.features`."""
