"""rnnserve.export: turn a training checkpoint into a servable bundle.

A bundle is `<repo>/<name>/<version>/{model.onnx, manifest.json, tokenizer.json}`. `manifest` and
`bundle` are torch-free (the server reads them); `onnx_export` and `validate` need the `train` extra.
"""
