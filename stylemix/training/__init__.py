"""Training as the library sees it: the settings (config.py) and the job queue (jobs.py).

The training loop itself is trainers/lora.py, started by module name (`python -m trainers.lora`).
"""
