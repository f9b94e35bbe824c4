"""ipaflow flows: the Prefect render flow, scheduled generation and the command line."""
