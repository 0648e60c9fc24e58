"""The HTTP service: settings, auth, schemas, routes and the Redis store."""
