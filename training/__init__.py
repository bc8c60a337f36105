"""rnnserve.training: recurrent language models and text classifiers, tokenizers, data, training loops.

Importing this package does not import torch; the submodules `model`, `train`, `sample`,
`classifier_model` and `classifier_train` do. `tokenizer`, `data`, `classifier_data`, `config`, `datasets`
and `cli` are torch-free.
"""
