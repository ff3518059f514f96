"""The per-prompt record: the numbers of one next-token distribution for each prompt.

One record type from where the numbers are computed (`lens.answer_stats`, one batch) through the pass
over all prompts (`collect`, which fills one `Dist` per distribution, in the input's row order) to the
calibration metrics that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from recallfix.patches.calibrator import CALIBRATION_TOP_K


@dataclass
class Dist:
    """Per-prompt numbers of one next-token distribution, [N] (a batch, or every prompt on CPU) but `top_logprobs`."""

    p_answer: torch.Tensor
    rank: torch.Tensor  # 1 = the answer is the top token
    confidence: torch.Tensor  # top-1 probability
    prediction: torch.Tensor  # top-1 token
    nll: torch.Tensor  # -log p(answer)
    brier: torch.Tensor  # multi-class Brier score: sum_k (p_k - 1[k = answer])^2
    top_logprobs: torch.Tensor  # [N, CALIBRATION_TOP_K] the most likely tokens' log-probabilities, most likely first

    @property
    def correct(self) -> torch.Tensor:
        """Top-1 is the answer (ties count as wrong only when another token is strictly above)."""
        return self.rank == 1

    @classmethod
    def empty(cls, n: int) -> Dist:
        """N zero rows on CPU, to be filled batch by batch with `put`."""
        def zeros(name: str) -> torch.Tensor:
            if name == "top_logprobs":
                return torch.zeros(n, CALIBRATION_TOP_K)
            return torch.zeros(n, dtype=torch.long if name in ("rank", "prediction") else None)

        return cls(**{f.name: zeros(f.name) for f in fields(cls)})

    def put(self, index: torch.Tensor, batch: Dist) -> None:
        """Store a batch's record at rows `index` (moved to this record's device and dtypes)."""
        for f in fields(self):
            mine = getattr(self, f.name)
            mine[index] = getattr(batch, f.name).detach().to(mine.device, mine.dtype)

    def take(self, rows: torch.Tensor) -> Dist:
        return Dist(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})
