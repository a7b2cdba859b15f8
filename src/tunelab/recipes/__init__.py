"""Recipes: each a flat ``train(config) -> result`` function that reads top to bottom."""
