"""Decoding and preparing inputs: every bad input becomes a typed error (core.errors) here."""
