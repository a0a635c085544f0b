"""Records from a JSON-lines file or a 🤗 datasets dataset, the format they are in, and their
fields checked: every record, before anything is tokenized or loaded.

A record travels with where it came from ("train.jsonl line 7", "imdb row 12"), so that every
error names the line to fix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from hift.train import TrainError

Record = tuple[str, dict]  # (where it came from, the record)

# What each format needs, and what it is for (said in the errors).
FIELDS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "classification": ("text", "label"),
}
KINDS = ("`text` (language modelling), `prompt` and `completion` (the prompt is not trained on), "
         "`messages` (a list of {role, content}; the assistant turns are trained on), or `text` and "
         "`label` (classification)")


def read(source: str, split: Optional[str] = None, flag: str = "--data") -> list[Record]:
    """Every record of `source`: a JSON-lines file, a directory written by datasets'
    save_to_disk, or a datasets hub name."""
    path = Path(source)
    if path.is_file():
        return _read_json_lines(path, flag)
    if path.is_dir() or not _looks_like_hub_name(source):
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return _read_dataset(source, split, flag, from_disk=True)
        what = "a directory that datasets' save_to_disk did not write" if path.is_dir() else "no such file"
        raise TrainError(f"{flag} {source}: {what}. Give a JSON-lines file (one JSON object per line), "
                         "a save_to_disk directory, or a datasets hub name")
    return _read_dataset(source, split, flag, from_disk=False)


def _looks_like_hub_name(source: str) -> bool:
    return not source.startswith((".", "/", "~")) and source.count("/") <= 1 and \
        not source.endswith((".json", ".jsonl", ".yaml", ".txt", ".csv"))


def _read_json_lines(path: Path, flag: str) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TrainError(f"{flag} {path}: not UTF-8 text ({err}); save it as UTF-8 JSON lines") from None
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise TrainError(f"{flag} {path} line {err.lineno}: not valid JSON ({err.msg}, column "
                             f"{err.colno}); the file must be a JSON array of objects or one JSON "
                             "object per line") from None
        records = [(f"{path} record {i + 1}", v) for i, v in enumerate(values)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                if not records and _one_object(text):
                    raise TrainError(f"{flag} {path} is one JSON object spread over many lines; JSON lines "
                                     "puts each record, whole, on a line of its own") from None
                raise TrainError(f"{flag} {path} line {number}: not valid JSON ({err.msg}, column "
                                 f"{err.colno}); each line must be one JSON object, such as "
                                 '{"text": "..."}') from None
            records.append((f"{path} line {number}", value))
    if not records:
        raise TrainError(f"{flag} {path} holds no records: put one JSON object per line, such as "
                         '{"text": "..."}')
    for where, value in records:
        if not isinstance(value, dict):
            raise TrainError(f"{where}: a JSON {type(value).__name__}, not an object; each record "
                             f"must be an object with {KINDS}")
    return records


def _one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_dataset(source: str, split: Optional[str], flag: str, from_disk: bool) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise TrainError(f"{flag} {source} is not a file, so it would be read with 🤗 datasets, which is "
                         "not installed: pip install datasets, or give a JSON-lines file") from None
    try:
        data = datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source)
    except Exception as err:
        raise TrainError(f"{flag} {source}: datasets could not load it ({type(err).__name__}: {err}). "
                         "Give a JSON-lines file, a save_to_disk directory, or a hub name where the hub "
                         "is reachable") from None
    if isinstance(data, datasets.DatasetDict):
        name = split or "train"
        if name not in data:
            raise TrainError(f"{flag} {source} has no split {name!r}; its splits are "
                             f"{', '.join(data)}: pass one with --split / --eval-split")
        data = data[name]
    if len(data) == 0:
        raise TrainError(f"{flag} {source} holds no records")
    return [(f"{source} row {i}", dict(row)) for i, row in enumerate(data)]


def detect_format(records: list[Record], forced: str = "auto") -> str:
    """The format the records are in: `forced` unless "auto", else from the first record's fields."""
    if forced != "auto":
        return forced
    where, first = records[0]
    keys = set(first)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    raise TrainError(f"{where}: its fields {sorted(keys)} match no format; each record needs {KINDS}. "
                     "Rename the fields, or pass --format")


def check(records: list[Record], fmt: str) -> None:
    """Every record has its format's fields, of the right types; the first that does not is named."""
    for where, record in records:
        missing = [f for f in FIELDS[fmt] if f not in record or record[f] is None]
        if missing:
            raise TrainError(f"{where}: no {', '.join(map(repr, missing))} field; format {fmt} needs "
                             f"{', '.join(FIELDS[fmt])} in every record (fix the record or remove it)")
        problem = _problem(record, fmt)
        if problem:
            raise TrainError(f"{where}: {problem}")


def _problem(record: dict, fmt: str) -> Optional[str]:
    def text_field(name: str, empty_ok: bool = False) -> Optional[str]:
        value = record[name]
        if not isinstance(value, str):
            return f"{name!r} must be a string, not {type(value).__name__} ({_short(value)})"
        if not value and not empty_ok:
            return f"{name!r} is empty"
        return None

    if fmt == "text":
        return text_field("text")
    if fmt == "prompt_completion":
        return text_field("prompt", empty_ok=True) or text_field("completion")
    if fmt == "classification":
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            return (f"'label' must be an integer class id or a class name, not "
                    f"{type(label).__name__} ({_short(label)})")
        return text_field("text")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return (f"messages[{i}] must be an object with a string 'role' and a string 'content', "
                    f"not {_short(m)}")
    if not any(m["role"] == "assistant" for m in messages):
        return "no message has role 'assistant', so there is nothing to train on"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
