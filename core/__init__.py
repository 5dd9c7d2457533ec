"""Shared contracts of NeuroNova Inference: errors, settings, model cards, model store, decoded images."""
