"""FeatherFace networks. `build_model(name)` builds one of `MODELS` by name."""
from models.featherface import MODELS, FeatherFace, build_model, count_parameters

__all__ = ["MODELS", "FeatherFace", "build_model", "count_parameters"]
