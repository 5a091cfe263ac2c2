"""arcface_torch's ``train_v2.py`` loop as a library; ``train.py`` is its shell."""

__all__ = ["main"]


def main(config_path: str, *, existing: str = "refuse", resume: bool = False) -> int:
    """Train with the config at ``config_path``; returns a process exit code. ``existing``:
    what to do with an earlier run in the output folder; ``resume``: continue the run there
    (:func:`otface.train.run.main`).

    For the command line: once training has ended, a SIGTERM (torchrun's, sent to every rank
    when one of them fails) no longer kills the process, so that it exits with the code it
    reported (1 after a lost rank, say) rather than -15.
    """
    import signal
    import threading

    from otface.train.run import main as _main

    code = _main(config_path, existing=existing, resume=resume)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
