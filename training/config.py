"""The training configuration (torch-free so the CLI can build its flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Everything a language-model training run needs; the defaults train a small char LSTM on the stdlib."""

    data: str | None = None  # text file or directory of .txt files; None = stdlib .py modules
    tokenizer: str = "char"  # "char" | "word" | "bpe" (byte-level), built on the training split only
    min_count: int = 5  # tokens seen fewer times map to <unk> (keeps the stdlib char vocab ~100)
    max_vocab: int | None = 30_000  # word vocabulary cap / BPE target size, specials included (not char)
    max_chars: int = 1_500_000  # size cap of the default stdlib corpus
    val_fraction: float = 0.1  # held out for validation when the data has no valid split
    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru
    layers: int = 2  # stacked recurrent layers
    hidden: int = 256  # hidden size of each layer
    emb: int = 128  # embedding size
    dropout: float = 0.1  # between layers and before the output projection
    tie_weights: bool = False  # share embedding and output matrices (needs emb == hidden)
    epochs: int = 1  # passes over the training stream
    batch_size: int = 32  # parallel streams
    bptt: int = 64  # truncated-BPTT window (tokens per step and stream)
    lr: float = 4e-3  # peak learning rate
    clip: float = 1.0  # gradient-norm clip
    optimizer: str = "adam"  # adam | adamw | sgd (with `momentum`)
    weight_decay: float = 0.0  # L2 (adam, sgd) or decoupled (adamw) weight decay
    momentum: float = 0.9  # sgd only
    schedule: str = "none"  # none | cosine (to 0 over all steps) | plateau (halve lr when val loss stalls)
    warmup_steps: int = 0  # linear warm-up from 0 to `lr` (schedules none and cosine)
    plateau_patience: int = 0  # plateau: epochs without a better val loss before the lr is halved
    patience: int | None = None  # early stopping: epochs without a better val loss; None = never stop
    max_steps_per_epoch: int | None = None  # bound an epoch (demo/tests); None = the whole stream
    max_steps: int | None = None  # stop (saving last.pt) after this many steps in all; `resume` continues
    time_budget_min: float | None = None  # end the run (evaluate, save) after this many minutes of training
    save_every: int = 200  # write last.pt every this many steps (and at each epoch end)
    log_every: int = 10  # append a step row to metrics.jsonl every this many steps
    resume: bool = False  # continue from out_dir/last.pt (model, optimiser, schedule, RNG, data position)
    force: bool = False  # start a new run in an out_dir that holds another run's last.pt (overwriting it)
    plot: bool = True  # write learning_curves.png at the end (needs matplotlib)
    tensorboard: bool = False  # also write TensorBoard event files to out_dir/tensorboard (needs tensorboard)
    max_eval_tokens: int | None = 100_000  # cap on validation tokens per evaluation; None or 0 = all
    eval_batch_size: int = 16  # parallel streams when evaluating
    seed: int = 1234  # torch seed (data order is deterministic)
    threads: int | None = None  # torch.set_num_threads; None = leave torch's default
    device: str = "cpu"  # "cpu", "cuda", or "auto"
    amp: str = "auto"  # mixed precision: auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    deterministic: bool = False  # deterministic kernels (cuDNN/cuBLAS); a little slower on CUDA
    progress: bool = True  # show a tqdm bar (loss, ppl, tokens/s)
    out_dir: str = "runs/lm"  # checkpoint.pt and tokenizer.json are written here
    # Corpus files and splits (rnnserve.training.data; `data` picks up a DIR's train/valid/test layout).
    train_file: str | None = None  # explicit training text (instead of `data`); no valid_file = split it
    valid_file: str | None = None  # explicit validation text (needs train_file)
    test_file: str | None = None  # explicit test text (needs train_file), read and tokenized, not trained on
    corpus_format: str = "auto"  # auto | text (a file is a document) | tokenized (WikiText/PTB lines)
    split_seed: int = 0  # picks held-out documents when the data has no validation split


@dataclass
class ClassifierTrainConfig:
    """A text-classifier training run; the defaults are the SST-2 BiLSTM recipe of docs/results.md."""

    train: str = ""  # TSV/CSV file (header row; text + label columns) or a directory-per-label tree
    dev: str | None = None  # same layouts; None = hold out `dev_fraction` of the training examples
    dev_fraction: float = 0.1  # used only when dev is None
    text_column: str | None = None  # None = detect (sentence, content, text, review, ...)
    label_column: str | None = None  # None = detect (label, labels, sentiment, ...)
    label_names: list[str] | None = None  # display names by class id; None = from the data (0/1 -> neg/pos)
    tokenizer: str = "word"  # "word" | "bpe"; built from the training split only
    lowercase: bool = True  # a Lowercase normalizer inside tokenizer.json
    vocab_size: int | None = 30_000  # cap on word vocabulary / BPE target size (specials included)
    min_freq: int = 1  # words (or BPE pairs) seen fewer times in train are not in the vocabulary
    cell: str = "lstm"  # rnn_tanh | rnn_relu | lstm | gru
    layers: int = 1  # stacked recurrent layers
    hidden: int = 256  # hidden size per layer and direction
    emb: int = 300  # embedding size
    bidirectional: bool = True  # whole-text model; False = streamable (chunk by chunk) model
    pooling: str = "max"  # max | mean | last, over the per-position outputs
    dropout: float = 0.5  # between recurrent layers and on the pooled vector
    emb_dropout: float = 0.3  # on the embeddings
    epochs: int = 6  # at most this many passes (early stopping may end sooner)
    batch_size: int = 64  # examples per step (length-bucketed)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    clip: float = 5.0  # gradient-norm clip
    patience: int = 2  # stop after this many evaluations without a better dev accuracy
    evals_per_epoch: int = 2  # dev evaluations (and checkpoint chances) per epoch
    max_train_examples: int | None = None  # random subset of the training examples (quick runs)
    max_len: int | None = 200  # training truncates texts to this many tokens (prediction never does)
    seed: int = 1234  # torch seed, data shuffling and subsampling
    threads: int | None = None  # torch.set_num_threads; None = leave torch's default
    device: str = "cpu"  # "cpu", "cuda", or "auto"
    progress: bool = True  # tqdm bar and per-evaluation lines
    out_dir: str = "runs/classifier"  # checkpoint.pt and tokenizer.json are written here
    save_every: int = 200  # write last.pt every this many steps (and after each evaluation)
    max_steps: int | None = None  # stop (saving last.pt) after this many steps in all; `resume` continues
    resume: bool = False  # continue from out_dir/last.pt (model, optimiser, RNG, data order and position)
    force: bool = False  # start a new run in an out_dir that holds another run's last.pt (overwriting it)
