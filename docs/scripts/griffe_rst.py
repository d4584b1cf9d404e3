"""A griffe extension that renders the reStructuredText the library's docstrings use.

The docstrings follow Google style for their sections (``Arguments:``), which mkdocstrings
parses, and reStructuredText for the rest, which ``help()`` and doctest read as plain text but
Markdown would show raw. Before mkdocstrings renders them, this extension rewrites:

* ``#:`` comments above a module or class attribute into that attribute's docstring (Sphinx's
  convention), so documented constants appear in the reference;
* literal blocks (a paragraph ending in ``::`` followed by an indented block) into fenced code
  blocks: ``pycon`` for doctest sessions, ``python`` for code that compiles, ``text`` otherwise;
* simple tables (columns framed by ``=====  =====`` lines) into Markdown tables;
* roles (``:func:`connect```, ``:class:`~resilient_tasks.RetryPolicy```, ``:meth:``,
  ``:mod:``, ``:data:``, ...) into cross-references to the documented object. A leading ``~``
  shows only the last part of the name, as in Sphinx. A relative name is looked up from the
  docstring's own object outwards (class, module, package).

A role that names something the reference does not document (a private module, a name from
another library) becomes inline code. A role that names nothing at all, in this package or
outside it, is reported as a warning, which fails ``mkdocs build --strict``: it is a typo in
a docstring.

Used from ``mkdocs.yml``::

    plugins:
      - mkdocstrings:
          handlers:
            python:
              options:
                extensions:
                  - docs/scripts/griffe_rst.py:RestructuredText
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>func|class|meth|mod|data|attr|exc|obj|const):`(?P<target>[^`]+)`"
)
LITERAL_INTRO = re.compile(r"^(?P<indent>\s*)(?P<text>.*?)(?P<space>\s?)::\s*$")
TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
COMMENT_DOC = re.compile(r"^\s*#:\s?(?P<text>.*)$")


class RestructuredText(griffe.Extension):
    """Rewrite every docstring of a package once it is completely loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.is_attribute and obj.docstring is None:
                _docstring_from_comments(obj)
        for obj in objects:
            if obj.docstring is not None:
                text = _literal_blocks(obj.docstring.value)
                text = _simple_tables(text)
                obj.docstring.value = _roles(text, obj, pkg)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias and member.parent is obj:
            yield from _walk(member)


def _docstring_from_comments(attr: griffe.Object) -> None:
    """The ``#:`` comment lines right above the attribute's assignment, as its docstring."""
    lines = attr.module.lines
    if not lines or attr.lineno is None:
        return
    found: list[str] = []
    number = attr.lineno - 2  # 0-based index of the line above the assignment
    while number >= 0 and (match := COMMENT_DOC.match(lines[number])):
        found.insert(0, match["text"])
        number -= 1
    if found:
        attr.docstring = griffe.Docstring(
            "\n".join(found), lineno=number + 2, endlineno=attr.lineno - 1, parent=attr
        )


def _literal_blocks(text: str) -> str:
    """Turn reST literal blocks into fenced code blocks, at the introducing line's indent."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        match = LITERAL_INTRO.match(line)
        if match is None or _in_fence(out):
            out.append(line)
            index += 1
            continue
        indent = len(match["indent"])
        block_start = index + 1
        while block_start < len(lines) and not lines[block_start].strip():
            block_start += 1
        end = block_start
        while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > indent):
            end += 1
        while end > block_start and not lines[end - 1].strip():
            end -= 1
        if end == block_start:  # "::" with no block after it: leave the line alone
            out.append(line)
            index += 1
            continue
        block = lines[block_start:end]
        strip = min(_indent_of(b) for b in block if b.strip())
        code = [b[strip:] if b.strip() else "" for b in block]
        # reST: "Text::" becomes "Text:"; a lone "::" (or "text ::") disappears.
        intro = match["text"] if match["space"] or not match["text"] else match["text"] + ":"
        pad = " " * indent
        if intro.strip():
            out.extend([pad + intro.rstrip(), ""])
        out.append(f"{pad}```{_language(code)}")
        out.extend(pad + c if c else "" for c in code)
        out.extend([f"{pad}```", ""])
        index = end
    return "\n".join(out).rstrip("\n")


def _in_fence(lines: list[str]) -> bool:
    return sum(1 for line in lines if line.lstrip().startswith("```")) % 2 == 1


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _language(code: list[str]) -> str:
    first = next((c for c in code if c.strip()), "")
    if first.startswith(">>>"):
        return "pycon"
    try:
        compile("\n".join(code), "<docstring>", "exec")
    except SyntaxError:
        return "text"
    return "python"


def _simple_tables(text: str) -> str:
    """Turn reST simple tables (one header row) into Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        if not TABLE_BORDER.match(lines[index]) or _in_fence(out):
            out.append(lines[index])
            index += 1
            continue
        border = lines[index]
        columns = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
        rows: list[list[str]] = []
        borders = 1
        index += 1
        while index < len(lines) and borders < 3:
            line = lines[index]
            index += 1
            if TABLE_BORDER.match(line):
                borders += 1
                continue
            cells = [_cell(line, start, columns, n) for n, (start, _) in enumerate(columns)]
            if rows and not cells[0] and borders == 2:  # a continuation line
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        header, *body = rows
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in body)
    return "\n".join(out)


def _cell(line: str, start: int, columns: list[tuple[int, int]], n: int) -> str:
    end = columns[n + 1][0] if n + 1 < len(columns) else len(line)
    return line[start:end].strip()


def _roles(text: str, context: griffe.Object, pkg: griffe.Module) -> str:
    """Turn reST roles into cross-references, outside code blocks."""
    parts = re.split(r"(^\s*```.*?^\s*```)", text, flags=re.MULTILINE | re.DOTALL)
    for n in range(0, len(parts), 2):  # the odd parts are code blocks
        parts[n] = ROLE.sub(lambda m: _reference(m, context, pkg), parts[n])
    return "".join(parts)


def _reference(match: re.Match[str], context: griffe.Object, pkg: griffe.Module) -> str:
    written = match["target"].strip()
    short = written.startswith("~")
    name = written.lstrip("~!")
    shown = name.rsplit(".", 1)[-1] if short else name
    if match["role"] in ("func", "meth") and not shown.endswith(")"):
        shown += "()"
    target = _resolve(name, context, pkg)
    if target is None:
        if name.split(".")[0] != pkg.name and "." in name:
            return f"`{shown}`"  # another library's name: inline code (there is no inventory)
        line = context.docstring.lineno if context.docstring else context.lineno
        griffe.logger.warning(
            f"{context.relative_filepath}:{line}: {match[0]} in the docstring of "
            f"{context.path} names nothing"
        )
        return f"`{shown}`"
    if not _documented(target):
        return f"`{shown}`"
    return f"[`{shown}`][{target.path}]"


def _resolve(name: str, context: griffe.Object, pkg: griffe.Module) -> griffe.Object | None:
    if name == pkg.name:
        return pkg
    if name.startswith(pkg.name + "."):
        candidates = [name[len(pkg.name) + 1 :]]
    else:
        candidates = []
        scope: griffe.Object | None = context
        while scope is not None:
            if scope is not pkg:
                candidates.append(f"{scope.path[len(pkg.name) + 1 :]}.{name}")
            else:
                candidates.append(name)
            scope = scope.parent
    for candidate in candidates:
        try:
            found = pkg[candidate]
            return found.final_target if found.is_alias else found
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return None


def _documented(obj: griffe.Object) -> bool:
    """Whether the API reference renders ``obj`` (public all the way down, with a docstring)."""
    if obj.docstring is None and not obj.is_module:
        return False
    chain = obj
    while chain.parent is not None:
        if chain.name.startswith("_") or not chain.is_public:
            return False
        chain = chain.parent
    return True
