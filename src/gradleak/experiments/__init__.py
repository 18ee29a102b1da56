"""Experiments: thin glue from a config to the library and to files on disk."""
