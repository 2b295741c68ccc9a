"""Small helpers every layer may use: dotted paths of pytrees, atomic folder writes, argument
checks, the history plot."""
