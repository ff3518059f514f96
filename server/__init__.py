"""recallfix.server: serve a model and its patch behind an OpenAI-compatible API (`recallfix serve`)."""
