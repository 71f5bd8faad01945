# These are the docs' runnable examples (scripts, run by .ci/run), not test modules:
# keep pytest from importing them if it ever collects this folder.
collect_ignore_glob = ["*.py"]
