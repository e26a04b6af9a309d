"""Job launch: render and submit Slurm batch scripts, derive ranks inside a job."""
