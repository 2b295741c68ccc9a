"""Training: ``fit`` and its phases and options, the compiled step, evaluation, tasks,
callbacks, run folders, data parallelism, WiSE-FT."""
