"""The embedded default of `make run`: a supervised local Redis, worker and API."""
