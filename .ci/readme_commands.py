"""The code blocks of README.md and the commands in them, for `.ci/run` and tests/unit/test_readme.py.

    python .ci/readme_commands.py quickstart    # prints the Quick start commands, one a line

`.ci/run` runs exactly what this prints, so README's Quick start and CI cannot drift apart.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SHELL_LANGS = ("bash", "sh", "shell", "console")
QUICKSTART = "Quick start"


@dataclass(frozen=True)
class Block:
    lang: str  # the info string after the opening fence ("bash", "python", "" ...)
    text: str
    line: int  # 1-based line of the opening fence in README.md
    section: str  # the heading the block sits under


def code_blocks(markdown: str) -> list[Block]:
    blocks, section, fence, start, lines = [], "", None, 0, []
    for n, line in enumerate(markdown.splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            m = re.match(r"^(```+)\s*([\w+-]*)", line)
            if m:
                fence, lang, start, lines = m.group(1), m.group(2), n, []
        elif line.strip() == fence:
            blocks.append(Block(lang, "\n".join(lines), start, section))
            fence = None
        else:
            lines.append(line)
    if fence is not None:
        raise ValueError(f"README.md:{start}: code block is never closed")
    return blocks


def commands(text: str) -> list[str]:
    """Shell commands of a block: `\\` continuations joined, blank and comment-only lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    if pending:
        raise ValueError(f"a command ends with a line continuation: {pending!r}")
    return out


def shell_blocks(markdown: str) -> list[Block]:
    return [b for b in code_blocks(markdown) if b.lang in SHELL_LANGS]


def quickstart(markdown: str) -> list[str]:
    """The commands of the shell blocks of the Quick start section, in order."""
    return [c for b in shell_blocks(markdown) if b.section == QUICKSTART for c in commands(b.text)]


def main(argv: list[str]) -> int:
    if argv != ["quickstart"]:
        print(__doc__, file=sys.stderr)
        return 2
    found = quickstart(README.read_text())
    if not found:
        print(f"{README}: no shell code block under '## {QUICKSTART}'", file=sys.stderr)
        return 1
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
