"""What an architecture is: one module per family, each declaring its ``Architecture`` plug-in
and checkpoint layouts; the registry, layers by kind, the ``Classifier`` head and block running
(remat, scan). Imports nothing from the rest of eqxtl but ``errors`` and ``_util``."""
