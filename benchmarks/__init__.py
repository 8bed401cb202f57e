"""Speed, memory and tightness benchmarks; ``python -m benchmarks`` rewrites BENCHMARKS.md."""
