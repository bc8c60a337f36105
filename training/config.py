"""The training configuration (torch-free so the CLI can build its flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Everything a language-model training run needs; the defaults train a small char LSTM on the stdlib."""

    data: str | None = None  # text file or directory of .txt files; None = stdlib .py modules
    tokenizer: str = "char"  # "char" | "word"
    min_count: int = 5  # tokens seen fewer times map to <unk> (keeps the stdlib char vocab ~100)
    max_vocab: int | None = 30_000  # word-level vocabulary cap (ignored for char)
    max_chars: int = 1_500_000  # size cap of the default stdlib corpus
    val_fraction: float = 0.1  # last 10% of the token stream is validation
    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru
    layers: int = 2  # stacked recurrent layers
    hidden: int = 256  # hidden size of each layer
    emb: int = 128  # embedding size
    dropout: float = 0.1  # between layers and before the output projection
    tie_weights: bool = False  # share embedding and output matrices (needs emb == hidden)
    epochs: int = 1  # passes over the training stream
    batch_size: int = 32  # parallel streams
    bptt: int = 64  # truncated-BPTT window (tokens per step and stream)
    lr: float = 4e-3  # Adam learning rate
    clip: float = 1.0  # gradient-norm clip
    max_steps_per_epoch: int | None = None  # bound an epoch (demo/tests); None = the whole stream
    max_eval_tokens: int | None = 100_000  # cap on validation tokens per evaluation; None = all
    eval_batch_size: int = 16  # parallel streams when evaluating
    seed: int = 1234  # torch seed (data order is deterministic)
    threads: int | None = None  # torch.set_num_threads; None = leave torch's default
    device: str = "cpu"  # "cpu", "cuda", or "auto"
    progress: bool = True  # show a tqdm bar (loss, ppl, tokens/s)
    out_dir: str = "runs/lm"  # checkpoint.pt and tokenizer.json are written here
