"""The methods the harness compares, by name. A spec string names a method and, optionally,
its options: "hift", "hift:group_size=2,order=bottom_up", "badam:switch_every=5"."""
from __future__ import annotations

from bench.methods.adalomo import AdaLomo
from bench.methods.adamw import AdamW
from bench.methods.base import Method, RunSpec, StepMethod
from bench.methods.block_adam import BAdam
from bench.methods.hift_fit import Hift
from bench.methods.lomo import Lomo
from bench.methods.lora import LoRA
from bench.methods.mezo import MeZO

METHODS: dict[str, type[Method]] = {m.name: m for m in (AdamW, Lomo, AdaLomo, MeZO, BAdam, LoRA, Hift)}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"hift:group_size=2,order=top_down" -> ("hift", {"group_size": "2", "order": "top_down"})."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; the methods are {sorted(METHODS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def make(spec: str) -> tuple[Method, dict[str, str]]:
    name, options = parse_spec(spec)
    return METHODS[name](), options


__all__ = ["METHODS", "Method", "RunSpec", "StepMethod", "make", "parse_spec"]
