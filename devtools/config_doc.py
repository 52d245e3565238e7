"""docs/configuration.md, generated from the settings classes of service/config.py: one table per group (variable,
type, default, description), in the order of config.GROUPS.

    python -m devtools.config_doc           # write docs/configuration.md
    python -m devtools.config_doc --check   # exit 1 when the committed file is not what the classes give

tests/test_config_doc.py runs the check, as tests/test_packaging.py does for the lock files.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service import config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = """# Configuration

Every setting is an environment variable prefixed `PUNKS_`, read by every surface (the CLI, the HTTP service,
Cog's runner, Ray Serve replicas) at start. A list is written as JSON (`PUNKS_BATCH_BUCKETS='[1, 2, 4]'`), a
flag as `true` or `false`.

This page is generated from the settings classes in `service/config.py` by `python -m devtools.config_doc`; edit
the classes, not this file (a test fails when it is stale).
"""


def type_name(annotation: Any) -> str:
    """How a field's type reads in the table: int, float, flag, text, path, secret, one of ..., list of ..."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        present = [arg for arg in args if arg is not type(None)]
        return " or ".join(type_name(arg) for arg in present) + (", optional" if len(present) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    names = {bool: "flag", int: "int", float: "float", str: "text", Path: "path", SecretStr: "secret"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(field: FieldInfo) -> str:
    """The field's numeric bounds, e.g. ' (1 to 100)' or ' (> 0)'."""
    low = next((f">= {m.ge}" for m in field.metadata if isinstance(m, Ge)), None)
    low = low or next((f"> {m.gt}" for m in field.metadata if isinstance(m, Gt)), None)
    high = next((f"<= {m.le}" for m in field.metadata if isinstance(m, Le)), None)
    high = high or next((f"< {m.lt}" for m in field.metadata if isinstance(m, Lt)), None)
    if low and high and low.startswith(">=") and high.startswith("<="):
        return f", {low[3:]} to {high[3:]}"
    return "".join(f", {bound}" for bound in (low, high) if bound)


def default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    parts = [HEADER]
    for group in config.GROUPS:
        summary = " ".join(inspect.cleandoc(group.__doc__ or group.__name__).split())
        title, _, about = summary.partition(": ")
        parts.append(f"\n## {title}\n\n{about[:1].upper()}{about[1:]}\n")
        parts.append("\n| Variable | Type | Default | Description |\n| --- | --- | --- | --- |\n")
        for name, field in group.model_fields.items():
            variable = f"`PUNKS_{name.upper()}`"
            row = (type_name(field.annotation) + bounds(field), default_text(field.default), field.description or "")
            parts.append(f"| {variable} | " + " | ".join(cell(text) for text in row) + " |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m devtools.config_doc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
