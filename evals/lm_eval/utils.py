"""The data of the `recallfix_facts` lm-evaluation-harness task, built from recallfix facts with the selection
`recallfix compare` uses (`recallfix.analysis.compare.run.select_facts`), so both see the same facts in the same
order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from recallfix.analysis.compare.run import select_facts


def _names(value: Any) -> tuple[str, ...] | None:
    """--metadata's relations: a list of names, or one comma-separated string as on the command line."""
    if not value:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(str(part).strip() for part in parts)


def load_facts(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The harness calls this with its --metadata merged with the model arguments: `facts` (a named set such as
    "lre", or a path), `relations`, `templates`, `run` and `split` are read, the rest ignored."""
    run = Path(kwargs["run"]) if kwargs.get("run") else None
    selection = select_facts(kwargs.get("facts") or None, run, kwargs.get("split") or None,
                             relations=_names(kwargs.get("relations")), templates=kwargs.get("templates") or None)
    rows = [{"prompt": f.prompt, "continuation": " " + f.answer, "answer": f.answer, "subject": f.subject or "",
             "relation": f.relation or ""} for f in selection.facts]
    return {"test": datasets.Dataset.from_list(rows)}
