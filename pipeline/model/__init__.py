"""The model: MDA network, VGG-16 features, weights (load/save), inference (the one weights -> Fuser path), MLflow pyfunc."""
