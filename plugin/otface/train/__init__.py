"""arcface_torch's ``train_v2.py`` loop as a library; ``train.py`` is its shell."""

__all__ = ["main"]


def main(config_path: str) -> int:
    """Train with the config at ``config_path``; returns a process exit code."""
    from otface.train.run import main as _main

    return _main(config_path)
