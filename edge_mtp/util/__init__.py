"""Small utilities every layer uses: atomic writes, caches, errors, memory, quiet native logs, prompts."""
