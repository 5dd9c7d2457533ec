"""Durable and shared state."""
