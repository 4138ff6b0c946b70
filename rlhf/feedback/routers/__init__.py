"""One router per resource: JSON API (users, projects, tasks, votes), pages, health."""
