"""What the command line shows: rich progress and tables, CI log lines, error lines and
exit codes."""
