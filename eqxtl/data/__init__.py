"""Images to batches: preprocessing and augmentation, sources, loaders behind one declared
batch-source protocol, feature caching."""
