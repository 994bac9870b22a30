"""`videoxl batch`: questions about many videos from a JSON Lines file, answered into another (jobs.py), by one
worker per device or per Ray actor (runner.py); the command line is cli.py."""
