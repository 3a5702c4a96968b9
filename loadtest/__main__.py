"""`python -m loadtest`: run the load test (options: `python -m loadtest --help`)."""

from loadtest.cli import main, run_command

if __name__ == "__main__":
    run_command(main)
