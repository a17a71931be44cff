"""Built-in demo: a synthetic two-style sequence task, its tokenizer and a shipped teacher."""
