"""The front: the worker's main loop, the API blueprint, health and metrics endpoints."""
