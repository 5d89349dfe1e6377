"""The trio runtime around the hub: the front door, sessions, the REST API, metrics."""
