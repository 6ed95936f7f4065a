"""Chapter: the checks a session with a GPU runs in one command, bash gpu_check/run.sh."""
