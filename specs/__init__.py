"""ipaflow specs: the declarative layer (spec and manifest schemas, bundled specs)."""
