"""The built-in demo: synthetic shapes data (``demo.data``) and the task demo table (``demo.task_demos``)."""
