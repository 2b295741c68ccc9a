"""Checkpoints in and out: ``from_pretrained`` / ``save_pretrained``, filling a model from
tensors by name, hub resolution, the torch-free ``.pth`` reader, labels and the tokenizer."""
