"""Math reasoning tasks with long sampled generations: GSM8K, MATH-500, AIME 2024 / 2025 (docs/benchmarks.md)."""

from evalkv.tasks.reasoning import aime, gsm8k, longgenbench, math500  # noqa: F401
