"""A toy tool for the multi-turn test: answers every model turn of a "calc:" prompt with a fixed result."""


def calculator(conv):
    if not conv.prompt.startswith("calc"):
        return None
    return "[tool:42]" if len(conv.turns) < 4 else None
