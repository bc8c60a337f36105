"""rnnserve.training: recurrent language models and text classifiers, tokenizers, data, training loops.

One training skeleton (`trainer`, with the checkpoint format in `checkpoint`) drives one `TrainTask`
(`task`) per kind of model: `lm_task`, `classifier_task`. Importing this package does not import torch;
the submodules `model`, `train`, `sample`, `classifier_model`, `classifier_train` and the skeleton's do.
`tokenizer`, `data`, `classifier_data`, `config`, `datasets` and `cli` are torch-free.
"""
