"""`rnnserve train lm|classifier ...`: the training subcommands (this module must not import torch at import
time)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from rnnserve.cells import CELLS
from rnnserve.training.config import ClassifierTrainConfig, TrainConfig

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_CLF_DEFAULTS = {f.name: f.default for f in fields(ClassifierTrainConfig)}


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `train` (nested `lm` and `classifier` subcommands), `sample` and `data` to an argparse
    subparsers; returns the kinds under `train`, where another kind of model adds its own subcommand."""
    train = subparsers.add_parser("train", help="train a model")
    kinds = train.add_subparsers(dest="train_command", required=True)
    lm = kinds.add_parser(
        "lm", help="train a recurrent language model (truncated BPTT)", argument_default=argparse.SUPPRESS
    )
    _add_lm_arguments(lm)
    lm.set_defaults(func=run_train_lm)
    clf = kinds.add_parser(
        "classifier",
        help="train a recurrent text classifier (pooling over time) on labelled text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Labelled text: a TSV/CSV file with a header row (text and label columns, detected by "
        "name) or a directory with one subdirectory per label holding one text per file.",
    )
    _add_classifier_arguments(clf)
    clf.set_defaults(func=run_train_classifier)
    _register_sample(subparsers)
    _register_data(subparsers)
    return kinds


def _add_lm_arguments(p: argparse.ArgumentParser) -> None:
    """LM flags. They have no argparse defaults (the parser suppresses absent flags), so that
    `config_from_args` can layer TrainConfig defaults < `--config` file < flags given on the command line."""
    d = _DEFAULTS

    def dflt(name: str) -> str:
        return f"(default: {d[name]})"

    p.add_argument("--config", help="TOML file whose keys are TrainConfig fields; flags given here win")
    p.add_argument(
        "--data",
        help="a directory with train/valid/test files (train.txt, wiki.train.tokens, ptb.train.txt...), "
        "a text file, or a directory of .txt files (default: the Python stdlib)",
    )
    p.add_argument("--train-file", help="explicit training text (instead of --data)")
    p.add_argument(
        "--valid-file", help="explicit validation text (default: hold out --val-fraction of train)"
    )
    p.add_argument("--test-file", help="explicit test text (tokenized with the training vocabulary)")
    p.add_argument(
        "--corpus-format",
        choices=["auto", "text", "tokenized"],
        help="text: a file is one document; tokenized: WikiText/PTB, one document per line, words split at "
        f"spaces, <unk> applied {dflt('corpus_format')}",
    )
    p.add_argument(
        "--val-fraction", type=float, help=f"held out when the data has no valid split {dflt('val_fraction')}"
    )
    p.add_argument("--split-seed", type=int, help=f"seed of that held-out split {dflt('split_seed')}")
    p.add_argument("--tokenizer", choices=["char", "word", "bpe"], help=dflt("tokenizer"))
    p.add_argument(
        "--max-vocab", type=int, help=f"word vocabulary cap / BPE size, 0 = no cap {dflt('max_vocab')}"
    )
    p.add_argument("--cell", choices=CELLS, help=dflt("cell"))
    p.add_argument("--layers", type=int, help=dflt("layers"))
    p.add_argument("--hidden", type=int, help=dflt("hidden"))
    p.add_argument("--emb", type=int, help=dflt("emb"))
    p.add_argument("--dropout", type=float, help=dflt("dropout"))
    p.add_argument("--tie-weights", action="store_true", help="share embedding/output (needs emb == hidden)")
    p.add_argument("--epochs", type=int, help=dflt("epochs"))
    p.add_argument("--batch-size", type=int, help=dflt("batch_size"))
    p.add_argument("--bptt", type=int, help=f"truncated-BPTT window in tokens {dflt('bptt')}")
    p.add_argument("--lr", type=float, help=f"peak learning rate {dflt('lr')}")
    p.add_argument("--clip", type=float, help=f"gradient-norm clip {dflt('clip')}")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help=dflt("optimizer"))
    p.add_argument("--weight-decay", type=float, help=dflt("weight_decay"))
    p.add_argument("--momentum", type=float, help=f"sgd momentum {dflt('momentum')}")
    p.add_argument(
        "--schedule",
        choices=["none", "cosine", "plateau"],
        help="lr schedule: cosine decays to 0 over the run; plateau halves the lr when the val loss "
        f"stalls {dflt('schedule')}",
    )
    p.add_argument(
        "--warmup-steps", type=int, help=f"linear lr warm-up (none, cosine) {dflt('warmup_steps')}"
    )
    p.add_argument(
        "--plateau-patience",
        type=int,
        help=f"epochs without improvement before halving {dflt('plateau_patience')}",
    )
    p.add_argument(
        "--patience", type=int, help="early stopping: epochs without a better val loss (default: off)"
    )
    p.add_argument(
        "--max-steps-per-epoch",
        type=int,
        help="cut each epoch to its first N steps (quick runs, tests; default: the whole training stream)",
    )
    p.add_argument(
        "--time-budget-min",
        type=float,
        help="train for at most this many minutes (then evaluate and save); the cosine schedule follows "
        "the clock when it runs ahead of the step count",
    )
    p.add_argument(
        "--max-eval-tokens", type=int, help="validation tokens per evaluation, 0 = all (default: 100000)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps in all: checkpoint.pt holds the best weights so far (evaluated at "
        "the stop if the run had no evaluation yet), `--resume` continues the run",
    )
    p.add_argument("--save-every", type=int, help=f"write last.pt every this many steps {dflt('save_every')}")
    p.add_argument("--log-every", type=int, help=f"metrics.jsonl step rows every N steps {dflt('log_every')}")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new run in an --out that holds an earlier run (its files are overwritten)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write learning_curves.png")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to TensorBoard (RUN/tensorboard; pip install tensorboard)",
    )
    p.add_argument("--max-chars", type=int, help=f"size of the default corpus {dflt('max_chars')}")
    p.add_argument("--min-count", type=int, help=f"rarer tokens become <unk> {dflt('min_count')}")
    p.add_argument("--seed", type=int, help=dflt("seed"))
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", help=f"cpu, cuda or auto {dflt('device')}")
    p.add_argument(
        "--amp", choices=["auto", "off", "bf16", "fp16"], help=f"mixed precision on CUDA {dflt('amp')}"
    )
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN/cuBLAS kernels")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the data summary and epoch lines stay)"
    )
    p.add_argument("--sample", type=int, default=300, help="print this many sampled tokens at the end")
    p.add_argument("--out", help="output directory (checkpoint.pt, last.pt, tokenizer.json, metrics.jsonl)")


# Flags whose TrainConfig field has another name or meaning.
_RENAMED = {"out": "out_dir"}
_NEGATED = {"no_progress": "progress", "no_plot": "plot"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The TrainConfig fields a TOML file sets; unknown keys are an error."""
    with Path(path).open("rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown TrainConfig keys {unknown} (known: {sorted(_DEFAULTS)})")
    return data


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig the parsed flags describe: defaults < `base` (a resumed run's config) < `--config`
    file < explicit flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for name, value in vars(args).items():
        if name in _NEGATED:
            if value:
                values[_NEGATED[name]] = False
        elif name in ("tie_weights", "resume", "force", "deterministic", "tensorboard"):
            if value:
                values[name] = True
        elif _RENAMED.get(name, name) in _DEFAULTS:  # not --config, --sample, func, command...
            values[_RENAMED.get(name, name)] = value
    if "out_dir" not in values:
        raise ValueError("--out is required (or out_dir in the --config file)")
    return TrainConfig(**values)


def run_train_lm(args: argparse.Namespace) -> int:
    """Train, print the checkpoint path, its metrics and a short sample; returns the exit code."""
    from rnnserve.training.distributed import launched_rank
    from rnnserve.training.runstate import TrainingStopped, read_run_config
    from rnnserve.training.train import train_language_model

    try:
        base = None
        if getattr(args, "resume", False):
            if not getattr(args, "out", None):
                raise ValueError("--resume needs --out (the directory of the run to continue)")
            base = read_run_config(args.out)
        config = config_from_args(args, base)
        path = train_language_model(config)
    except (ValueError, FileNotFoundError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        if launched_rank() != 0:
            return 130 if stop.reason == "interrupted" else 0  # rank 0 reports for the whole job
        print(f"{stop.reason} at step {stop.step}; the run's state is saved in {stop.last}", file=sys.stderr)
        print(f"continue it with: rnnserve train lm --out {config.out_dir} --resume", file=sys.stderr)
        if stop.checkpoint is not None and stop.reason != "interrupted":
            _report_lm(stop.checkpoint, args.sample, config.seed)
        return 130 if stop.reason == "interrupted" else 0
    if launched_rank() != 0:
        return 0  # under torchrun, rank 0 alone reports
    _report_lm(path, args.sample, config.seed)
    return 0


def _report_lm(path: Path, sample_tokens: int, seed: int) -> None:
    """Print the checkpoint's path, its metrics and (`sample_tokens` > 0) a sample from it."""
    from rnnserve.training.sample import sample_text
    from rnnserve.training.train import load_checkpoint

    model, tok, ckpt = load_checkpoint(path)
    m = ckpt["metrics"]
    print(f"checkpoint: {path}  (export it: rnnserve export {path} --repo model_repo --name NAME)")
    at = f"step {m['step']} (epoch {m['epoch']} unfinished)" if "step" in m else f"epoch {m['epoch']}"
    print(f"{at}: val loss {m['val_loss']:.4f}, val ppl {m['val_ppl']:.3f}")
    if "test_loss" in m:
        print(f"test loss {m['test_loss']:.4f}, test ppl {m['test_ppl']:.3f} (best checkpoint, test split)")
    if sample_tokens > 0:
        print("sample:\n" + sample_text(model, tok, max_tokens=sample_tokens, seed=seed))


def _register_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="generate text from a language-model checkpoint (PyTorch)")
    p.add_argument("checkpoint", help="checkpoint.pt of `rnnserve train lm` (tokenizer.json beside it)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a fresh document)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    """Print the prompt followed by a sampled continuation."""
    from rnnserve.training.sample import sample_text
    from rnnserve.training.train import load_checkpoint

    if args.max_tokens < 0 or args.temperature <= 0:
        print("error: --max-tokens must be >= 0 and --temperature > 0", file=sys.stderr)
        return 2
    try:
        model, tok, _ = load_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = sample_text(model, tok, args.prompt, args.max_tokens, args.temperature, args.seed)
    print(args.prompt + text)
    return 0


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="download public data sets (sha256-checked, cached)")
    cmds = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,list}")
    fetch = cmds.add_parser(
        "fetch",
        help="download a data set into the cache (or find it there), check its sha256, unpack it",
        description="Offline? Train on a local copy with `rnnserve train lm --data DIR`, or copy the files "
        "into the cache folder ($RNNSERVE_DATA_DIR/NAME/) and rerun fetch, or point $RNNSERVE_DATA_URL at a "
        "mirror.",
    )
    fetch.add_argument("name", help="a data set name (see `rnnserve data list`)")
    fetch.add_argument("--cache-dir", help="default: $RNNSERVE_DATA_DIR or ~/.cache/rnnserve/data")
    fetch.add_argument(
        "--url", help="mirror base URL laid out as BASE/NAME/FILE (default: $RNNSERVE_DATA_URL)"
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.set_defaults(func=run_data_fetch)
    cmds.add_parser("list", help="the data sets `fetch` knows").set_defaults(func=run_data_list)


def run_data_fetch(args: argparse.Namespace) -> int:
    """Fetch, then print the folder and how to train on it."""
    from rnnserve.training.datasets import REGISTRY, DataFetchError, fetch

    try:
        folder = fetch(args.name, args.cache_dir, args.url, progress=not args.no_progress)
    except DataFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    print(f"train on it with: {REGISTRY[args.name].usage.format(folder=folder)} ...")
    return 0


def run_data_list(args: argparse.Namespace) -> int:
    """Each data set: name, description, files and where its checksums come from."""
    from rnnserve.training.datasets import REGISTRY

    for d in REGISTRY.values():
        files = ", ".join(f.path + (" (unpacked)" if f.unpack else "") for f in d.files)
        print(f"{d.name}: {d.description}\n  files: {files}\n  {d.checksums}")
    return 0


def _add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    d = _CLF_DEFAULTS
    p.add_argument(
        "--train",
        help="TSV/CSV file, directory-per-label tree, or a data set folder with train/dev splits (SST-2's "
        "train.tsv + dev.tsv, IMDB's aclImdb/ with train/ + test/); required unless --resume",
    )
    p.add_argument("--dev", help="dev split, same layouts (default: hold out --dev-fraction of train)")
    p.add_argument(
        "--dev-fraction", type=float, default=d["dev_fraction"], help="held out of train without --dev"
    )
    p.add_argument(
        "--text-column", default=d["text_column"], help="default: detect (sentence, content, text...)"
    )
    p.add_argument("--label-column", default=d["label_column"], help="default: detect (label, sentiment...)")
    p.add_argument("--label-names", help="comma-separated display names by class id (default: from the data)")
    p.add_argument(
        "--tokenizer", choices=["word", "bpe"], default=d["tokenizer"], help="learnt on train only"
    )
    p.add_argument("--no-lowercase", action="store_true", help="keep case (default: lowercase normalizer)")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="vocabulary cap / BPE target size")
    p.add_argument(
        "--min-freq", type=int, default=d["min_freq"], help="rarer words (or BPE pairs) are dropped"
    )
    p.add_argument("--cell", choices=CELLS, default=d["cell"], help="recurrent cell")
    p.add_argument("--layers", type=int, default=d["layers"], help="stacked recurrent layers")
    p.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size per direction")
    p.add_argument("--emb", type=int, default=d["emb"], help="embedding size")
    bi = p.add_mutually_exclusive_group()
    bi.add_argument("--bidirectional", dest="bidirectional", action="store_true", default=d["bidirectional"],
                    help="whole-text model (default)")  # fmt: skip
    bi.add_argument("--unidirectional", dest="bidirectional", action="store_false",
                    help="streamable model: classifies a text chunk by chunk")  # fmt: skip
    p.add_argument("--pooling", choices=["max", "mean", "last"], default=d["pooling"], help="over time")
    p.add_argument("--dropout", type=float, default=d["dropout"], help="between layers, on the pooled vector")
    p.add_argument("--emb-dropout", type=float, default=d["emb_dropout"], help="on the embeddings")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="at most (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="examples per step")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clip")
    p.add_argument("--patience", type=int, default=d["patience"], help="evaluations without improvement")
    p.add_argument("--evals-per-epoch", type=int, default=d["evals_per_epoch"], help="dev evaluations")
    p.add_argument(
        "--max-train-examples", type=int, default=d["max_train_examples"], help="random subset (quick runs)"
    )
    p.add_argument("--max-len", type=int, default=d["max_len"], help="truncate training texts (tokens)")
    p.add_argument("--seed", type=int, default=d["seed"], help="weights, data order, subsampling")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads")
    p.add_argument("--device", default=d["device"], help="cpu, cuda or auto")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the data summary and evaluations stay)"
    )
    p.add_argument("--out", required=True, help="output directory (checkpoint.pt, last.pt, tokenizer.json)")
    p.add_argument("--save-every", type=int, default=d["save_every"], help="write last.pt every N steps")
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps in all: checkpoint.pt holds the best weights so far (evaluated at "
        "the stop if the run had no evaluation yet), `--resume` continues the run",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt (its saved config)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new run in an --out that holds an earlier run (its files are overwritten)",
    )


def classifier_config_from_args(args: argparse.Namespace) -> ClassifierTrainConfig:
    """The ClassifierTrainConfig that the parsed flags describe."""
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    return ClassifierTrainConfig(
        train=args.train,
        dev=args.dev,
        dev_fraction=args.dev_fraction,
        text_column=args.text_column,
        label_column=args.label_column,
        label_names=names,
        tokenizer=args.tokenizer,
        lowercase=not args.no_lowercase,
        vocab_size=args.vocab_size,
        min_freq=args.min_freq,
        cell=args.cell,
        layers=args.layers,
        hidden=args.hidden,
        emb=args.emb,
        bidirectional=args.bidirectional,
        pooling=args.pooling,
        dropout=args.dropout,
        emb_dropout=args.emb_dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        clip=args.clip,
        patience=args.patience,
        evals_per_epoch=args.evals_per_epoch,
        max_train_examples=args.max_train_examples,
        max_len=args.max_len,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
        out_dir=args.out,
        save_every=args.save_every,
        max_steps=args.max_steps,
        force=args.force,
    )


def run_train_classifier(args: argparse.Namespace) -> int:
    """Train, then print the checkpoint path and the dev report of the best checkpoint."""
    from rnnserve.training.classifier_data import DataError
    from rnnserve.training.classifier_train import (
        format_report,
        load_classifier_checkpoint,
        train_classifier,
    )
    from rnnserve.training.runstate import TrainingStopped, read_run_config

    try:
        if args.resume:  # the run's own config, from its last.pt
            config = ClassifierTrainConfig(**read_run_config(args.out))
        elif not args.train:
            raise ValueError("--train is required (or --resume to continue the run in --out)")
        else:
            config = classifier_config_from_args(args)
        path = train_classifier(config)
    except (ValueError, FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"{stop.reason} at step {stop.step}; the run's state is saved in {stop.last}", file=sys.stderr)
        print(f"continue it with: rnnserve train classifier --out {args.out} --resume", file=sys.stderr)
        if stop.checkpoint is not None and stop.reason != "interrupted":
            _, _, ckpt = load_classifier_checkpoint(stop.checkpoint)
            m = ckpt["metrics"]
            print(f"checkpoint: {stop.checkpoint}  (the best evaluation so far, at epoch {m['epoch']:.2f})")
            print(format_report(m["report"]))
        return 130 if stop.reason == "interrupted" else 0
    _, _, ckpt = load_classifier_checkpoint(path)
    m = ckpt["metrics"]
    print(f"checkpoint: {path}")
    print(
        f"best dev evaluation at epoch {m['epoch']:.2f}, after {m['train_seconds']:.0f} s "
        f"(the run took {ckpt['train_seconds_total']:.0f} s in all)"
    )
    print(format_report(m["report"]))
    return 0
