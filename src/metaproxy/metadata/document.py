"""Inventory documents as text: JSON or YAML in, JSON or YAML out (PyYAML's safe subset)."""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml

from metaproxy.errors import StoreError
from metaproxy.metadata import model

Format = Literal["json", "yaml"]


def parse(text: bytes, *, source: str) -> model.Inventory:
    """Parse a JSON or YAML document (JSON is YAML's subset) and validate it, or StoreError."""
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StoreError(f"{source}: not valid JSON or YAML: {exc}", field="document") from exc
    if doc is None:
        doc = {}
    return model.inventory_from_mapping(doc)


class _Dumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (user data) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(inventory: model.Inventory, fmt: Format) -> str:
    doc = model.inventory_to_mapping(inventory)
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    text = yaml.dump(
        doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    return str(text)
