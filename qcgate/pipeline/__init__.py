"""The pipeline: assemble received instances into cases, queue them, and (later) run QC jobs."""
