"""Orchestration: jobs that run a system end to end (library + export + runtime together).

This is the top layer: a job may import `flexjax`, `export` and `runtime`;
none of those imports a job. Entry points in `train/` parse flags and call a
job's ``run(config, workdir)``.
"""
