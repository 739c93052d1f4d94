"""Our models in the inference ecosystem: state-dict adapters to diffusers' `VQModel`, transformers'
`GPT2LMHeadModel` and ONNX graphs of the tokenizer, and back from diffusers. Each adapter is a pure
mapping of keys and shapes, checked strictly against the other library's own model; the libraries
are the `export` extra and are imported only inside these modules."""
