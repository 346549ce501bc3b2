"""Operating gradmimic: the command line, job submission to a Ray cluster, and a job's credentials."""
