"""The HTTP service: dependencies, middleware, error handlers, schemas and the routes by resource."""
