"""Step 5 of a run: the patches. Gains on the suppressing final-layer components (`gains`, fitted by `fit` through
the final block replayed on its captured inputs, `replay`, with the gains as hooks, `gain_hooks`); the paper's
intercept fix (`intercept`, `methods`); and the temperature-scaling baseline they are measured against
(`temperature`)."""
