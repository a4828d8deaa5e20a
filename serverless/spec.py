"""Write the CVAT label spec of ``function.yaml`` / ``function-gpu.yaml`` from a model bundle.

The spec (``metadata.annotations.spec``) is what CVAT reads to know the function's labels and attributes;
it is never written by hand. :func:`render_function_yaml` replaces only that block, so the comments and the
rest of the file stay as they are. ``deploy.sh`` runs this on the bundle it deploys; the committed files are
generated from the default bundle config (:func:`wbc_core.contract.default_contract`), and a test keeps them so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from wbc_core.contract import Contract, spec_json

_SPEC_LINE = re.compile(r"^(?P<indent>[ ]*)spec: \|[-+]?[ ]*$")


class SpecBlockError(ValueError):
    """The function yaml has no ``metadata.annotations.spec: |`` block to replace."""


def render_function_yaml(text: str, spec: list[dict[str, Any]]) -> str:
    """``text`` (a function yaml) with its ``annotations.spec`` literal block replaced by ``spec``."""
    lines = text.splitlines(keepends=True)
    in_annotations = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == "annotations:":
            in_annotations = True
            continue
        match = _SPEC_LINE.match(line.rstrip("\n"))
        if in_annotations and match:
            indent = len(match.group("indent"))
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or
                                        len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():  # keep the blank lines after the block
                end -= 1
            body = "".join(" " * (indent + 2) + row + "\n" for row in spec_json(spec).splitlines())
            return "".join(lines[:i + 1]) + body + "".join(lines[end:])
    raise SpecBlockError("no 'spec: |' block under metadata.annotations: is this a Nuclio function yaml?")


def write_spec(path: Path, contract: Contract) -> bool:
    """Rewrite ``path``'s spec from ``contract``; True if the file changed. The file is replaced atomically."""
    from wbc_core.atomic import atomic_write_bytes

    text = path.read_text()
    new = render_function_yaml(text, contract.spec())
    if new == text:
        return False
    atomic_write_bytes(path, new.encode())
    return True
