"""One router per resource: chat completions, completions, models, feedback, health and metrics."""
