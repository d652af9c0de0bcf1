"""Sharing a finished run: the upload folder with its model card, and the push to the Hugging Face Hub."""
