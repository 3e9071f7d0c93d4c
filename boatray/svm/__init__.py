"""The classical heads on extracted features: the estimators (estimators.py), their selection,
fit and run folders (heads.py), and `python -m boatray.svm`."""
