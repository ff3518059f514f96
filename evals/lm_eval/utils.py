"""The data of the `recallfix_facts` lm-evaluation-harness task, built from recallfix facts with the selection
`recallfix compare` uses (`recallfix.analysis.compare.run.select_facts`), so both see the same facts in the same
order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from recallfix.analysis.compare.run import select_facts


def load_facts(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The harness calls this with its --metadata merged with the model arguments: `facts`, `run` and `split`
    are read, the rest ignored."""
    def path(key: str) -> Path | None:
        return Path(kwargs[key]) if kwargs.get(key) else None

    selection = select_facts(path("facts"), path("run"), kwargs.get("split") or None)
    rows = [{"prompt": f.prompt, "continuation": " " + f.answer, "answer": f.answer, "subject": f.subject or "",
             "relation": f.relation or ""} for f in selection.facts]
    return {"test": datasets.Dataset.from_list(rows)}
