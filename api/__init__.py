"""HTTP concerns of the public service: error mapping, authentication, request limits. Only service.py imports it."""
