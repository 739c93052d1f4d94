"""taming_dist: Taming-Transformers (VQGAN tokenizer + GPT over its codes) at cluster scale."""

__version__ = "0.1.0"
