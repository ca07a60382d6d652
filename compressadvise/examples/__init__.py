"""Bundled example: a real small CNN trained on scikit-learn's handwritten digits."""
