"""Real pretrained models as test fixtures: builders (model code + weight loading) and a catalog."""
