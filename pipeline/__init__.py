"""rdpt: pretraining recurrent-depth language models (model, training, evaluation)."""

__version__ = "0.1.0"
