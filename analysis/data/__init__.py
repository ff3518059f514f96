"""Step 0 of a run: the facts (`facts`, the shipped set in `shipped/`), made-up subjects (`nonce`), neutral text
(`neutral_text`), tokenised batches (`batching`), and the model with its prompt sets loaded once (`inputs`)."""
