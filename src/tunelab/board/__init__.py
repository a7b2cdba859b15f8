"""``tunelab board``: a local web app (Gradio) to watch, compare, chat with, predict with and launch runs.

``runs`` and ``compare`` read run directories (never writing into them); ``talk`` loads finished runs
for chat and prediction; ``launch`` starts ``tunelab train`` in background processes; ``app`` builds
the Gradio page from them.
"""
