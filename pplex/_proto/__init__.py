"""Python modules generated from proto/upstream.proto by proto/generate.py; do not edit."""
