"""Steps 6-7 of a run: every patch replayed on the held-out prompts (`passes`), the comparison table with
bootstrap intervals (`evaluation`), and the findings turned into checks when asked (`require`, sets in `checks/`)."""
