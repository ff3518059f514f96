"""Steps 1-4 of a run: the one pass over the facts (`collect`) and what it measures: the logit lens (`lens`), direct
logit attribution and ablation effects (`attribution`), mover heads (`movers`), MLP regressions (`regression`),
and the findings with their intervals (`summaries`). `gemm` is the readout product they share."""
