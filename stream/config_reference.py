"""`stream/defaults.yaml`, generated from the config dataclasses (`ecg-stream config --defaults`).

The dataclasses are the one declaration of every setting; the comment beside a field is its
documentation. This renders them as the YAML reference users copy from, so the file and the
code cannot drift apart (a test compares them).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize

import yaml

from stream.config import Config

WIDTH = 100
HEADER = """\
# ecg-stream defaults, generated from stream/config.py by `ecg-stream config --defaults`:
# edit the dataclasses there, not this file. Override with --config FILE,
# ECG_<SECTION>__<KEY> env vars or --set section.key=value. Unknown keys are rejected.
"""
FIELD = re.compile(r"^    (\w+)\s*:")


def field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comments on the lines above a field and the one beside it."""
    comments, pending = {}, []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith(("def ", "@")):
            break
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = FIELD.match(line)
        if match:
            tokens = tokenize.generate_tokens(io.StringIO(line.strip()).readline)
            inline = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
            comments[match.group(1)] = " ".join(pending + inline)
        pending = []
    return comments


def _value(v) -> str:
    if v == "":
        return '""'
    return yaml.safe_dump(v, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _section(obj, indent: str) -> list[str]:
    lines, comments = [], field_comments(type(obj))
    for f in dataclasses.fields(obj):
        value, doc = getattr(obj, f.name), comments.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{f.name}:", *_section(value, indent + "  ")]
            continue
        line = f"{indent}{f.name}: {_value(value)}"
        if doc and len(line) + 3 + len(doc) <= WIDTH:
            lines.append(f"{line}  # {doc}")
        else:
            lines += [f"{indent}# {w}" for w in textwrap.wrap(doc, WIDTH - len(indent) - 2)]
            lines.append(line)
    return lines


def render_defaults(cfg: Config | None = None) -> str:
    """The documented YAML of a configuration (default: the defaults)."""
    cfg = cfg or Config()
    blocks = [HEADER.rstrip("\n")]
    for f in dataclasses.fields(cfg):
        doc = (type(getattr(cfg, f.name)).__doc__ or "").strip().splitlines()[0:1]
        head = [f"# {d}" for d in doc if not d.startswith(type(getattr(cfg, f.name)).__name__)]
        blocks.append("\n".join([*head, f"{f.name}:", *_section(getattr(cfg, f.name), "  ")]))
    return "\n\n".join(blocks) + "\n"
