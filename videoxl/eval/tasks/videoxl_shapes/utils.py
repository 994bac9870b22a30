"""lmms-eval imports this file by path for the YAMLs' `!function utils.*`; the functions live in the package."""
from videoxl.eval.shapes_task import (doc_to_choice, doc_to_target, doc_to_text, doc_to_visual,  # noqa: F401
                                      process_results)
