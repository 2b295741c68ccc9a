import os

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".no-tfds-data"))
