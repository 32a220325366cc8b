"""Running an experiment: engine, stages, cell jobs, executors, probes, planning, failures, store."""
