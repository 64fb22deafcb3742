"""The admin page (`joeybot admin`): test Joey's replies live against the deployed workers.

The page never loads a model. It enqueues `admin_generate` jobs for the worker pool and
reads the reply back from a Redis stream while the worker generates it.
"""
