"""Text for text-to-image models (issue 23): a frozen Hugging Face text encoder loaded from a local
folder (encoder.py), and a tiny one built from a config with a tokenizer trained on given captions
(tiny.py: tests and the demo, nothing downloaded).

`transformers` is an extra (`pip install taming-dist[text]`); only these modules import it.
"""
from .encoder import TextEncoder

__all__ = ["TextEncoder"]
