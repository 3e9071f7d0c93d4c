"""`python -m boatray.svm`: the classical heads (boatray.approaches on features) on a features
file."""
