"""Jobs: aligning one user, compiling many, comparing optimizers, tuning the aligner.

What the command line runs; may import every package below it. Nothing below imports a job.
"""
