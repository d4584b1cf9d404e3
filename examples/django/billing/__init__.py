"""A Django app whose ``tasks.py`` uses resilient-tasks."""
