"""The temperature-scaling baseline: one T for the model's logits, fitted (NLL) on the train split.

Every patch is checked against it: a patch that only rescales confidence should do no better than T.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from recallfix.patches import ComponentMap

from .. import calibration as cal
from ..config import AnalysisConfig
from ..data.inputs import Loaded
from ..mechanism.collect import Collected
from ..mechanism.lens import lens_logits

# Logits kept in memory while the temperature is fitted (rows x vocab floats); above it they are recomputed on
# every Newton step instead (very large vocabularies or train splits).
MAX_CACHED_LOGITS = 100_000_000


def logit_chunks(cmap: ComponentMap, x_final: torch.Tensor, answers: torch.Tensor, batch_size: int,
                 device: torch.device) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The model's logits from the stored final residuals, batch by batch (for `fit_temperature`): computed once
    and kept when they fit in `MAX_CACHED_LOGITS`, else recomputed on every call."""
    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for start in range(0, len(answers), batch_size):
                rows = slice(start, start + batch_size)
                yield lens_logits(cmap, x_final[rows].to(device)), answers[rows].to(device)

    if len(answers) * cmap.shape.vocab_size > MAX_CACHED_LOGITS:
        return chunks
    cached = list(chunks())
    return lambda: iter(cached)


def fit_baseline_temperature(s: Loaded, c: Collected, config: AnalysisConfig) -> float:
    """The temperature-scaling baseline's T, fitted (NLL) on the train split."""
    train = s.known.rows("train")
    return cal.fit_temperature(logit_chunks(s.cmap, c.x_final[train], s.known.answers[train], config.batch_size,
                                            s.device))
