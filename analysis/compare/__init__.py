"""`recallfix compare`: two served models A/B-compared over HTTP on a facts set (`run`), each fact asked through an
OpenAI-compatible client (`client`), results.json typed by `schema`, report.md and the table by `report`."""
