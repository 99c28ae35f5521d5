"""Frontends: model formats in, IR graphs out."""
