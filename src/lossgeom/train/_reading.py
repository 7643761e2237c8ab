"""Reading config files: safe YAML with duplicate keys refused, clear errors.

Shared by training configs and study files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

__all__ = ["format_errors", "read_source", "read_yaml"]


def format_errors(err: ValidationError, title: str) -> str:
    """A pydantic error as lines ``path: reason (got value)`` under ``title``."""
    lines = [f"{title}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def read_source(
    source: Any, what: str, fields: str, error: type[ValueError]
) -> tuple[Any, str]:
    """``(plain data, where it came from)`` of a dict or a YAML file's path.

    Args:
        source: a dict, or the path of a YAML file (read safely, duplicate keys
            refused); anything else is returned as it is.
        what: what the file is, for messages (``training config``).
        fields: its main fields, for the message about a non-mapping.
        error: the error class for invalid YAML or a non-mapping.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    where = "dict"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
        where = str(path)
        try:
            source = read_yaml(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise error(f"{where} is not valid YAML: {err}") from None
        if not isinstance(source, dict):
            raise error(
                f"a {what} is a mapping of fields ({fields}, ...); {where} holds a "
                f"{type(source).__name__}."
            )
    return source, where


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, never code) that refuses duplicate keys.

    It also reads ``1e-3`` as a float (YAML 1.2), as a reader of a config expects.
    """

    def construct_mapping(self, node, deep=False):  # noqa: D102
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} appears twice (lines {seen[key]} and {line}); "
                        "keep one of them",
                        key_node.start_mark,
                    )
                try:
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """Plain data from YAML text: safe loading, duplicate keys refused.

    Raises:
        yaml.YAMLError: the text is not valid YAML or repeats a key (the message
            names the key and its lines).
    """
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
