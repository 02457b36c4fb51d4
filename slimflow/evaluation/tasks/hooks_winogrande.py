"""lm-eval's own WinoGrande prompt functions, re-exported so the bundled YAML can name them with `!function`."""

from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

__all__ = ["doc_to_choice", "doc_to_target", "doc_to_text"]
