"""The benchmark commands (`python -m benchmarks.<name>`) and their committed results. Not packaged:
they are tools, run from a checkout; they may import app, optim and loadtest, never the reverse."""
