"""The completions server behind `python -m mygpt_jax.serve`: engine (device), scheduler (thread), sequence
(text), api (request checks), app (HTTP routes), static/ (the playground page)."""
