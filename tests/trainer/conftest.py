import os

# Nothing in the trainer tests may reach a model hub. huggingface_hub reads these once, at
# import, so they are set here, before any test module imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
