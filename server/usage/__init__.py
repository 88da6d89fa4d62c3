"""Usage: tokens and requests per API key and adapter version over time."""
