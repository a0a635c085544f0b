"""The options of `hift train`: every field of hift.Config as a flag, made from the dataclass
itself (its type hints, its defaults, the comments beside it in config.py) so the two never
drift, plus the command's own options; and a YAML/JSON config file under the flags.

Precedence: the defaults, then the file (`--config run.yaml`), then the flags on the line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Any, Callable

from hift import config as config_module
from hift.config import Config
from hift.train import TrainError

FORMATS = ("auto", "text", "prompt_completion", "messages", "classification")

# Config fields a command line cannot express, and why.
NOT_FLAGS = {"units": "a list of modules (use hift.fit from Python)",
             "on_step": "a Python callable (hift train uses it for metrics and evaluation)"}
# Where hift train's default differs from Config's.
TRAIN_DEFAULTS = {"save_every": 500}
# What hift train puts in a field left unset.
TRAIN_UNSET = {"save_dir": "the output directory", "resume_from": "with --resume, the save directory"}

# The command's own options: (flag, argparse keywords).
TRAIN_OPTIONS: list[tuple[str, dict]] = [
    ("--model", dict(help="a local model directory (config.json, weights and tokenizer, as written by "
                          "save_pretrained), or a hub id where the hub is reachable")),
    ("--data", dict(help="training data: a JSON-lines file (one JSON object per line), a dataset "
                         "directory written by datasets' save_to_disk, or a datasets hub name")),
    ("--eval-data", dict(help="held-out data in the same format, evaluated every --eval-every steps "
                              "and at the end (loss; accuracy for classification)")),
    ("--output-dir", dict(help="where checkpoints (step-N/), final/, metrics.jsonl and loss.png go "
                               "(default: runs/<model directory's name>)")),
    ("--format", dict(choices=FORMATS, default="auto",
                      help="auto: from the fields of the first record: messages -> messages; prompt "
                           "and completion -> prompt_completion; text and label -> classification; "
                           "text -> text (language modelling)")),
    ("--max-length", dict(type=int, default=512, help="tokens per example; longer ones are truncated")),
    ("--batch-size", dict(type=int, default=8, help="examples per micro-batch (see --accum-steps)")),
    ("--eval-batch-size", dict(type=int, default=None, help="default: --batch-size")),
    ("--eval-every", dict(type=int, default=None,
                          help="evaluate --eval-data every N steps (default: only before and after training)")),
    ("--num-labels", dict(type=int, default=None,
                          help="classification: size of the head (default: the model's own head, else "
                               "the labels in the data)")),
    ("--split", dict(default="train", help="the split of a datasets dataset to train on")),
    ("--eval-split", dict(default=None, help="the split of --eval-data (default: --split)")),
    ("--device", dict(default=None, help="cpu, cuda, cuda:N (default: cuda where available)")),
    ("--shuffle", dict(action=argparse.BooleanOptionalAction, default=True,
                       help="a new order every epoch, drawn from --seed")),
    ("--resume", dict(action="store_true",
                      help="continue from the newest checkpoint in the output directory (the same "
                           "data and options as the run that wrote it)")),
    ("--overwrite", dict(action="store_true",
                         help="start afresh in an output directory that already holds a run")),
]
REQUIRED = ("model", "data")


@dataclasses.dataclass
class Options:
    train: argparse.Namespace  # the command's own options
    config: dict[str, Any]  # Config fields, for fit(**config)


def none_or(base: type) -> Callable[[str], Any]:
    def convert(text: str):
        return None if text.strip().lower() in ("none", "null") else base(text)

    convert.__name__ = base.__name__  # argparse names the type in its errors
    return convert


def field_docs() -> tuple[dict[str, str], dict[str, str]]:
    """(help of each field, section of each field) from the comments in Config's source: a
    comment after a blank line heads a section; one directly above a field, or at the end of
    its line, is its help."""
    helps: dict[str, str] = {}
    sections: dict[str, str] = {}
    try:
        lines = inspect.getsource(Config).splitlines()
    except (OSError, TypeError):
        return helps, sections
    body = next((i + 1 for i, line in enumerate(lines) if line.lstrip().startswith("class ")), len(lines))
    section, block, block_after_blank, blank = "other options", [], False, True
    for raw in lines[body:]:
        line = raw.strip()
        if line.startswith(("def ", "@")):
            break
        if not line:
            blank, block = True, []
            continue
        if line.startswith("#"):
            if not block:
                block_after_blank = blank
            block.append(line.lstrip("# "))
            blank = False
            continue
        match = re.match(r"(\w+)\s*:", line)
        if match is None:
            continue
        name = match.group(1)
        if block and block_after_blank:
            section = " ".join(block)
        elif block:
            helps[name] = " ".join(block)
        elif blank:
            section = "other options"
        if "  # " in line:
            helps[name] = " ".join(filter(None, [helps.get(name), line.split("  # ", 1)[1]]))
        sections[name] = section
        block, blank = [], False
    return helps, sections


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Config)
    helps, sections = field_docs()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        if f.name in NOT_FLAGS:
            continue
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
            optional = True
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        default = TRAIN_DEFAULTS.get(f.name, f.default)
        notes = []
        if hint is bool:
            notes.append("default: " + {True: "on", False: "off", None: "auto"}[default])
        elif default is not None:
            notes.append(f"default: {default}" + (" in hift train" if f.name in TRAIN_DEFAULTS else ""))
        if f.name in TRAIN_UNSET:
            notes.append(f"unset in hift train: {TRAIN_UNSET[f.name]}")
        elif optional and hint is not bool:
            notes.append("none: unset")
        text = f"{helps.get(f.name, '')} ({'; '.join(notes)})" if notes else helps.get(f.name, "")
        kwargs: dict[str, Any] = dict(dest=f.name, default=default)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs=len(typing.get_args(hint)), type=typing.get_args(hint)[0], metavar=f.name.upper())
        elif hint in (int, float, str):
            kwargs["type"] = none_or(hint) if optional else hint
        else:
            raise TypeError(f"Config.{f.name} has type {hint}, which hift train cannot make a flag of: "
                            "add it to NOT_FLAGS or teach options.py its type")
        choices = getattr(config_module, f.name.upper() + "S", None)  # ORDERS, PRECISIONS, ...
        if isinstance(choices, tuple):
            kwargs["choices"] = choices
        section = sections.get(f.name, "other options")
        if section not in groups:
            groups[section] = parser.add_argument_group(f"hift.Config: {section}")
        groups[section].add_argument(_flag(f.name), help=text.strip().replace("%", "%%"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hift train",
        description="Fine-tune every parameter of a model with hift on your own data. The data "
                    "is a JSON-lines file whose records hold `text` (language modelling), `prompt` "
                    "and `completion` (the prompt is not trained on), `messages` (a chat, through the "
                    "tokenizer's chat template; only the assistant turns are trained on) or `text` and "
                    "`label` (classification).",
        epilog="Every option can also come from a YAML or JSON file (--config run.yaml), its keys "
               "named as the flags without the dashes (lr, group_size, eval_data, ...); flags on the "
               "command line win. Not available here: "
               + "; ".join(f"{k} ({why})" for k, why in NOT_FLAGS.items())
               + ". Example: hift train --model ./my-model --data train.jsonl --eval-data dev.jsonl "
                 "--output-dir runs/mine --lr 1e-5 --num-cycles 20 --eval-every 50",
    )
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a YAML (.yaml, .yml) or JSON file of options")
    own = parser.add_argument_group("what to train, on what, and where it goes")
    for flag, kwargs in TRAIN_OPTIONS:
        own.add_argument(flag, **kwargs)
    _add_config_fields(parser)
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:
        kind = "YAML" if file.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise TrainError(f"--config {path} could not be read as {kind}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainError(f"--config {path} must hold a mapping of option: value, not a {type(values).__name__}")
    return values


def _file_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A value from the file, converted as its flag would convert the text."""
    where = f"--config {path}: {key}"
    if value is None:
        return None
    try:
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if isinstance(action.nargs, int):
            if not isinstance(value, (list, tuple)) or len(value) != action.nargs:
                raise ValueError(f"expected a list of {action.nargs} values, got {value!r}")
            return tuple(action.type(v) if isinstance(v, str) else v for v in value)
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a single value, got {value!r}")
        if action.type is not None and isinstance(value, str):
            value = action.type(value)  # YAML reads 2e-5 as text
        elif action.type is not None and action.type is not str:
            value = action.type(str(value)) if isinstance(value, (int, float)) else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise TrainError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise TrainError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def parse(argv=None) -> Options:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    actions = _actions(parser)
    if first.config is not None:
        values = read_config_file(first.config)
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                hint = difflib.get_close_matches(dest, actions, n=1)
                why = f" ({NOT_FLAGS[dest]})" if dest in NOT_FLAGS else ""
                raise TrainError(
                    f"--config {first.config}: unknown option {key!r}{why}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" The options are: {', '.join(sorted(actions))}")
            defaults[dest] = _file_value(actions[dest], key, value, first.config)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for name in REQUIRED:
        if getattr(args, name) is None:
            raise TrainError(f"no {name}: pass {_flag(name)} or put `{name}:` in the --config file")
    field_names = {f.name for f in dataclasses.fields(Config)}
    config = {k: v for k, v in vars(args).items() if k in field_names}
    train = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in field_names})
    return Options(train, config)


def check_config(options: dict) -> Config:
    """The Config these options make, validated as fit will validate it, before anything loads."""
    from hift.config import ConfigError

    try:
        return Config.build(**options)
    except ConfigError as err:
        first = re.match(r"\w+", str(err))
        name = first.group(0) if first else ""
        known = {f.name for f in dataclasses.fields(Config)}
        where = f" (the flag {_flag(name)}, or `{name}:` in the --config file)" if name in known else ""
        raise TrainError(f"{err}{where}") from None
