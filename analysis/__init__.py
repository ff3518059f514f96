"""recallfix.analysis: find the final-layer suppression of factual answers in a causal LM and learn a patch for it.

The folders are the steps of a run, in the order it flows; each imports only from the folders before it:

    data/         the facts (and the shipped set), invented subjects, neutral text, tokenised batches
    mechanism/    the one pass over the facts: logit lens, attribution, mover heads, MLP regressions, findings
    learn/        the patches: gains fitted through the replayed final block, the paper's intercept fix,
                  and the temperature-scaling baseline
    evaluate/     every patch replayed on held-out prompts, the comparison table, the --require checks
    report/       report.md and its plots, rendered from the typed result
    compare/      `recallfix compare`: two served models A/B-compared over HTTP
    demo_model/   the project's own small trained model (corpus, training, card)

Shared by all of them: `config` (every setting, stated once), `schema` (analysis.json's typed sections),
`records` (the per-prompt numbers of a next-token distribution), `calibration` (metrics and bootstrap
intervals), `progress` (bars and log lines). `pipeline` is the recipe that runs the steps top to bottom,
`cli` its commands, `rundiff` the check that two runs wrote the same files.
"""
