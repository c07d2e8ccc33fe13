"""The HTTP layer: the only place that knows HTTP and turns errors into problem responses."""
