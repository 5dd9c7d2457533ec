"""One BentoML service per model (the new-style form of BentoML runners), composed into `service.NeuroNova`."""
