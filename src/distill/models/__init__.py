"""Networks: the built-in zoo, Hugging Face models, and models named by import path."""

from distill.models import zoo  # noqa: F401  (registers the zoo)
from distill.models import causal_lm, hf  # noqa: F401  (register the Hugging Face entry points)
from distill.models import text  # noqa: F401  (registers text_classifier)
from distill.models.build import build_model, count_parameters

__all__ = ["build_model", "count_parameters"]
