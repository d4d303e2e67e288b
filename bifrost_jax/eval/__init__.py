"""Evaluation: sharded generation for benchmarks, reconstruction metrics and the shapes checker
(``shapes_checker``: reads colour, shape, count and relative position from generated pixels)."""
