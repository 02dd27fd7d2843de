"""The built-in demo: synthetic shapes data (``python -m demo.data``) and the task demo table
(``python -m demo.task_demos``)."""
