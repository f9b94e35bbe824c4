"""ipaflow.core: the bottom layer (storage, redaction, row problems); it imports nothing else of ipaflow."""
