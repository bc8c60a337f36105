"""rnnserve.training: recurrent language models, tokenizers, data and the training loop.

Importing this package does not import torch; the submodules `model`, `train` and `sample` do.
`tokenizer`, `data`, `config` and `cli` are torch-free.
"""
