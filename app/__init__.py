"""The service: the HTTP API (``http``), jobs and the task queue (``jobs``), prompt sets as a whole
(``sets``), the Redis store (``store``) and the embedded default of `make run` (``dev``);
``main`` assembles the API, ``config`` holds its settings."""
