"""How `make bench` runs its sections: each one's figures are printed (and the JSON report saved)
the moment it ends, a section the CPU cannot run is skipped with its reason in one line, and a
section that fails records its error and the bench goes on.

Before this, the bench printed nothing until its end (8 minutes and more) and a bf16 section on an
AVX2-only CPU raised there, losing every figure measured before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def cpu_report() -> dict:
    """The CPU the figures come from: model name, the flags that decide bf16, and whether bf16 runs."""
    from ..device import bf16_support, cpu_flags, cpu_model

    support = bf16_support()
    return {"model": cpu_model(), "flags": cpu_flags(), "bf16": support._asdict()}


def no_bf16() -> str:
    """Why the bf16 sections are skipped on this CPU ("" where bf16 runs: ``device.bf16_support``)."""
    from ..device import bf16_support

    support = bf16_support()
    return "" if support.ok else f"bf16 does not run on this CPU: {support.reason}"


def cpu_line(cpu: dict) -> str:
    have = [f for f, on in cpu["flags"].items() if on]
    bf16 = "runs" if cpu["bf16"]["ok"] else f"does not run ({cpu['bf16']['reason']})"
    return f"cpu       {cpu['model']}; flags: {' '.join(have) or 'none of the bf16-relevant ones'}; bf16 {bf16}"


def done(result) -> bool:
    """A section that ran to the end (not skipped, not failed)."""
    return isinstance(result, dict) and "skipped" not in result and "error" not in result


def say(line: str) -> None:
    print(line, flush=True)


class Sections:
    """Runs sections into ``report`` (a dict, or a part of one: ``child``), calling ``save`` after each."""

    def __init__(self, report: dict | None = None, save: Callable[[], None] | None = None):
        self.report = {} if report is None else report
        self._save = save or (lambda: None)

    def save(self) -> None:
        self._save()

    def child(self, name: str) -> "Sections":
        return Sections(self.report.setdefault(name, {}), self._save)

    def run(self, name: str, fn: Callable[[], object], show: Callable[[object], None] | None = None,
            skip: str = "", label: str | None = None):
        """``fn()`` into ``report[name]`` and ``show(result)``; ``skip`` (a reason) records and says
        it instead; an exception becomes ``{"error": ...}`` and one line. Returns the result."""
        label = label or name
        if skip:
            result = {"skipped": skip}
            say(f"{label}: skipped: {skip}")
        else:
            try:
                result = fn()
            except Exception as exc:  # KeyboardInterrupt still stops the bench
                first = (str(exc).strip().splitlines() or [""])[0]
                result = {"error": f"{type(exc).__name__}: {first}"}
                say(f"{label}: failed: {result['error']} (the figures above are kept; going on)")
            else:
                if show is not None and result is not None:
                    show(result)
                sys.stdout.flush()
        self.report[name] = result
        self.save()
        return result


def json_saver(path: Path, report: dict) -> Callable[[], None]:
    """Writes ``report`` to ``path`` (whole, replaced atomically): called after every section."""

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(path)

    return save
