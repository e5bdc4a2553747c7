"""The default prompt set used to measure quality and speed when the user gives none."""

DEFAULT_PROMPTS = ["The quick brown fox", "Once upon a time, in a small village,", "def fibonacci(n):",
                   "Speculative decoding makes phones faster because"]
