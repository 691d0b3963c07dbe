"""How messages get from the broker to a worker without being lost or run twice (see delivery.redis)."""
