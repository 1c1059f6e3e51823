"""`ntm lab render TEMPLATE OUT [-- CMD...]`: fill a config template, then run CMD.

Daemons such as NSD and Unbound cannot read environment variables, but their pid, database
and log paths must point into the per-lab state directory. The template's ${VAR} are taken
from the environment (plus ${CWD}, the working directory); a missing one is an error.
"""

from __future__ import annotations

import os
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.errors import LabError


def render_text(template: str, env: Mapping[str, str]) -> str:
    try:
        return string.Template(template).substitute(env)
    except KeyError as exc:
        raise LabError(
            f"template needs ${{{exc.args[0]}}}; set it in the service's environment"
        ) from None
    except ValueError as exc:
        raise LabError(f"template has a stray `$` ({exc}); write a literal dollar as $$") from None


def render(template: Path, out: Path, env: Mapping[str, str]) -> None:
    try:
        text = template.read_text()
    except FileNotFoundError:
        raise LabError(
            f"template {template} not found (paths are relative to {os.getcwd()})"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_text(text, {**env, "CWD": os.getcwd()}))


def main(template: str, out: str, command: Sequence[str]) -> int:
    render(Path(template), Path(out), os.environ)
    if command:
        sys.stdout.flush()
        os.execvp(command[0], list(command))
    return 0
