"""Train a declared stream's model on its own history: files or a topic range (data.py, topic.py) -> the
checked, split rows -> a model file with its card, optionally a registry version (history.py)."""
