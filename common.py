"""Shared by both methods: backbones, tower seams, text features, metrics, run folders."""


class UserError(Exception):
    """A problem with the user's input; the CLIs print its message as one line and exit."""
