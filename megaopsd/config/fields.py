"""Every config field with its default and its documentation, read from where it is declared.

Each field of ``megaopsd/config/schema.py`` is documented by the comment on its line, or by the
comment lines just above it. ``field_docs()`` collects them; ``python -m megaopsd.config``
prints them all (or one section: ``python -m megaopsd.config rollout``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from megaopsd.config import schema

_FIELD = re.compile(r"^    (\w+): [^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    name: str  # section.field
    default: typing.Any  # dataclasses.MISSING when required
    doc: str


def _section_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        comment, field = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            above.append(comment.group(1).strip())
        elif field:
            parts = [*above, field.group(2) or ""]
            docs[field.group(1)] = " ".join(p for p in parts if p).strip()
            above = []
        else:
            above = []
    return docs


def field_docs() -> list[FieldDoc]:
    """One entry per field of every section, in declaration order."""
    out = []
    sections = typing.get_type_hints(schema.Config)
    for section in dataclasses.fields(schema.Config):
        cls = sections[section.name]
        docs = _section_docs(cls)
        for field in dataclasses.fields(cls):
            default = field.default
            if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            out.append(FieldDoc(f"{section.name}.{field.name}", default, docs.get(field.name, "")))
    return out


def describe(section: str | None = None) -> str:
    """The listing ``python -m megaopsd.config`` prints."""
    lines = []
    for doc in field_docs():
        if section is not None and not doc.name.startswith(f"{section}."):
            continue
        default = "(required)" if doc.default is dataclasses.MISSING else repr(doc.default)
        lines.append(f"{doc.name} = {default}" + (f"\n    {doc.doc}" if doc.doc else ""))
    return "\n".join(lines)
