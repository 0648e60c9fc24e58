"""Jobs: their records and lifecycle, and the task queue the API and the workers share."""
